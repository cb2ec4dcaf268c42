/* /usr/libexec/corral/screenshot in the desktop template: PNG screenshots of the X display in $DISPLAY, the
   root window with the pointer (XFixes) drawn in, zlib level 1.
     screenshot [--pointer|-p] [--overwrite|-o] PATH.png   one capture in this process; then starts the server
                                                           for this display when none answers
     screenshot --serve                                    the server /usr/local/bin/scrot hands captures to:
                                                           keeps the X connection (and a shared-memory image)
                                                           open; ends when the X server does */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <png.h>
#include <poll.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <X11/Xlib.h>
#include <X11/Xutil.h>
#include <X11/extensions/XShm.h>
#include <X11/extensions/Xfixes.h>

extern char **environ;

static char socket_path[108];
static Display *display;
static XShmSegmentInfo segment;
static XImage *shared;  /* the server's capture buffer, for the root window's current size */

static int socket_path_for(const char *name) {
    if (!name || name[0] != ':' || strlen(name) > 16 || strchr(name, '/')) return -1;
    snprintf(socket_path, sizeof socket_path, "/tmp/.corral-screenshot-%s", name + 1);
    return 0;
}

static unsigned channel(unsigned long pixel, unsigned long mask) {
    if (!mask) return 0;
    int shift = 0;
    while (!(mask & 1)) { mask >>= 1; shift++; }
    return (unsigned)(((pixel >> shift) & mask) * 255 / mask);
}

static void drop_shared(void) {
    if (!shared) return;
    XShmDetach(display, &segment);
    XDestroyImage(shared);
    shmdt(segment.shmaddr);
    shared = NULL;
}

/* The root window into an XImage: through shared memory when the server has MIT-SHM and can attach ours
   (no copy of the pixels through the socket), else XGetImage. `*owned` says the caller destroys it. */
static XImage *grab(int width, int height, int *owned) {
    *owned = 0;
    if (shared && (shared->width != width || shared->height != height)) drop_shared();
    if (!shared && XShmQueryExtension(display)) {
        int screen = DefaultScreen(display);
        shared = XShmCreateImage(display, DefaultVisual(display, screen), DefaultDepth(display, screen), ZPixmap,
                                 NULL, &segment, width, height);
        if (shared) {
            segment.shmid = shmget(IPC_PRIVATE, (size_t)shared->bytes_per_line * height, IPC_CREAT | 0600);
            segment.shmaddr = shared->data = segment.shmid < 0 ? (char *)-1 : shmat(segment.shmid, NULL, 0);
            segment.readOnly = False;
            if (segment.shmaddr == (char *)-1 || !XShmAttach(display, &segment)) {
                if (segment.shmaddr != (char *)-1) shmdt(segment.shmaddr);
                shared->data = NULL;
                XDestroyImage(shared);
                shared = NULL;
            }
            XSync(display, False);
            if (segment.shmid >= 0) shmctl(segment.shmid, IPC_RMID, NULL);  /* freed once both detach */
        }
    }
    if (shared && XShmGetImage(display, DefaultRootWindow(display), shared, 0, 0, AllPlanes)) return shared;
    *owned = 1;
    return XGetImage(display, DefaultRootWindow(display), 0, 0, width, height, AllPlanes, ZPixmap);
}

/* One screenshot, as a PNG written to `out`; 0, or an error message. */
static const char *capture(FILE *out, int pointer) {
    XWindowAttributes attributes;
    if (!XGetWindowAttributes(display, DefaultRootWindow(display), &attributes)) return "no root window";
    int width = attributes.width, height = attributes.height, owned;
    XImage *image = grab(width, height, &owned);
    if (!image) return "the X server returned no image";
    unsigned char *rgb = malloc((size_t)width * height * 3);
    if (!rgb) { if (owned) XDestroyImage(image); return "out of memory"; }
    int fast = image->bits_per_pixel == 32 && image->red_mask == 0xff0000 && image->green_mask == 0xff00 &&
               image->blue_mask == 0xff && image->byte_order == LSBFirst;
    for (int y = 0; y < height; y++) {
        unsigned char *to = rgb + (size_t)y * width * 3;
        if (fast) {
            const unsigned char *from = (const unsigned char *)image->data + (size_t)y * image->bytes_per_line;
            for (int x = 0; x < width; x++, from += 4, to += 3) { to[0] = from[2]; to[1] = from[1]; to[2] = from[0]; }
        } else {
            for (int x = 0; x < width; x++, to += 3) {
                unsigned long pixel = XGetPixel(image, x, y);
                to[0] = channel(pixel, image->red_mask);
                to[1] = channel(pixel, image->green_mask);
                to[2] = channel(pixel, image->blue_mask);
            }
        }
    }
    if (owned) XDestroyImage(image);
    int event_base, error_base;
    if (pointer && XFixesQueryExtension(display, &event_base, &error_base)) {
        XFixesCursorImage *cursor = XFixesGetCursorImage(display);
        if (cursor) {
            for (int cy = 0; cy < cursor->height; cy++) {
                int y = cursor->y - cursor->yhot + cy;
                if (y < 0 || y >= height) continue;
                for (int cx = 0; cx < cursor->width; cx++) {
                    int x = cursor->x - cursor->xhot + cx;
                    if (x < 0 || x >= width) continue;
                    unsigned long argb = cursor->pixels[cy * cursor->width + cx];  /* premultiplied */
                    unsigned alpha = (argb >> 24) & 0xff;
                    unsigned char *px = rgb + ((size_t)y * width + x) * 3;
                    for (int c = 0; c < 3; c++) {
                        unsigned source = (argb >> (16 - 8 * c)) & 0xff;
                        px[c] = (unsigned char)(source + px[c] * (255 - alpha) / 255);
                    }
                }
            }
            XFree(cursor);
        }
    }
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        free(rgb);
        return "PNG encoding failed";
    }
    png_init_io(png, out);
    png_set_compression_level(png, 1);
    png_set_filter(png, 0, PNG_FILTER_SUB);
    png_set_IHDR(png, info, width, height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < height; y++) png_write_row(png, rgb + (size_t)y * width * 3);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(rgb);
    return NULL;
}

static int x_gone(Display *gone) {  /* Xlib's I/O error handler: the X server ended or was replaced */
    (void)gone;
    unlink(socket_path);
    _exit(0);
}

static void reply(int client, const char *error) {
    char message[256] = {0};
    if (error) snprintf(message + 1, sizeof message - 1, "%s", error), message[0] = 1;
    send(client, message, error ? 1 + strlen(message + 1) : 1, MSG_NOSIGNAL);
}

static void answer(int client) {
    char request;
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    struct iovec part = {.iov_base = &request, .iov_len = 1};
    struct msghdr message = {.msg_iov = &part, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof control.space};
    if (recvmsg(client, &message, MSG_CMSG_CLOEXEC) != 1) return;
    struct cmsghdr *rights = CMSG_FIRSTHDR(&message);
    if (!rights || rights->cmsg_type != SCM_RIGHTS || rights->cmsg_len != CMSG_LEN(sizeof(int))) {
        reply(client, "no file was passed");
        return;
    }
    int fd;
    memcpy(&fd, CMSG_DATA(rights), sizeof(int));
    FILE *out = fdopen(fd, "wb");
    if (!out) { close(fd); reply(client, strerror(errno)); return; }
    const char *error = capture(out, request == 'p');
    if (fclose(out) && !error) error = strerror(errno);
    reply(client, error);
}

static int serve(void) {
    int listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    memcpy(address.sun_path, socket_path, sizeof address.sun_path);
    if (listener < 0) return 1;
    if (bind(listener, (struct sockaddr *)&address, sizeof address)) {
        /* one already serves this display, or a dead one left its socket */
        if (!connect(listener, (struct sockaddr *)&address, sizeof address)) return 0;
        close(listener);
        listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        unlink(socket_path);
        if (bind(listener, (struct sockaddr *)&address, sizeof address)) return 1;
    }
    chmod(socket_path, 0666);  /* any user of the sandbox may take a screenshot, as with the display itself */
    if (listen(listener, 16)) return 1;
    XSetIOErrorHandler(x_gone);
    struct pollfd watched[2] = {{.fd = listener, .events = POLLIN}, {.fd = ConnectionNumber(display), .events = POLLIN}};
    for (;;) {
        if (poll(watched, 2, -1) < 0) continue;
        if (watched[1].revents) {  /* events we never asked for, or the server hung up (then x_gone) */
            XSync(display, True);
        }
        if (watched[0].revents & POLLIN) {
            int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
            if (client < 0) continue;
            answer(client);
            close(client);
        }
    }
}

/* After a capture here (no server answered): start one for the next captures, detached from our caller. */
static void start_server(const char *self) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    posix_spawn_file_actions_init(&actions);
    for (int fd = 0; fd < 3; fd++) posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", O_RDWR, 0);
    posix_spawnattr_init(&attributes);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSID);
    char *args[] = {(char *)self, "--serve", NULL};
    pid_t pid;
    posix_spawn(&pid, "/proc/self/exe", &actions, &attributes, args, environ);
}

int main(int argc, char **argv) {
    int pointer = 0, serving = 0;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--serve")) serving = 1;
        else if (!strcmp(argv[i], "--pointer") || !strcmp(argv[i], "-p")) pointer = 1;
        else if (!strcmp(argv[i], "--overwrite") || !strcmp(argv[i], "-o")) continue;
        else if (argv[i][0] != '-' && !path) path = argv[i];
        else { fprintf(stderr, "usage: %s [--pointer] [--overwrite] PATH.png | --serve\n", argv[0]); return 2; }
    }
    if (!serving && !path) { fprintf(stderr, "usage: %s [--pointer] [--overwrite] PATH.png | --serve\n", argv[0]); return 2; }
    const char *name = getenv("DISPLAY");
    display = XOpenDisplay(NULL);
    if (!display) { fprintf(stderr, "screenshot: cannot open display %s\n", name ? name : "(DISPLAY unset)"); return 1; }
    if (serving) return socket_path_for(name) ? 2 : serve();
    FILE *out = fopen(path, "wb");
    if (!out) { perror(path); return 1; }
    const char *error = capture(out, pointer);
    if (fclose(out) && !error) error = strerror(errno);
    if (error) { fprintf(stderr, "screenshot: %s: %s\n", path, error); return 1; }
    if (!socket_path_for(name)) {
        int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        struct sockaddr_un address = {.sun_family = AF_UNIX};
        memcpy(address.sun_path, socket_path, sizeof address.sun_path);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&address, sizeof address)) start_server(argv[0]);
    }
    return 0;
}
