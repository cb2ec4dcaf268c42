/* /usr/local/bin/scrot in the desktop template: hands the SDK's `scrot --pointer PATH.png` to the screenshot
   server that keeps the X connection open (no X libraries loaded here: starting a program costs tens of ms
   under gVisor), passing it the opened file. Any other use, or no server, runs the capture tool itself. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define CAPTURE_TOOL "/usr/libexec/corral/screenshot"

static int run(const char *program, char **argv) {
    argv[0] = (char *)program;
    execv(program, argv);
    perror(program);
    return 1;
}

int main(int argc, char **argv) {
    int pointer = 0;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--pointer") || !strcmp(argv[i], "-p")) pointer = 1;
        else if (!strcmp(argv[i], "--overwrite") || !strcmp(argv[i], "-o")) continue;  /* it always does */
        else if (argv[i][0] == '-' || path) return run("/usr/bin/scrot", argv);  /* anything else: scrot itself */
        else path = argv[i];
    }
    size_t length = path ? strlen(path) : 0;
    if (length < 5 || strcmp(path + length - 4, ".png")) return run("/usr/bin/scrot", argv);
    const char *display = getenv("DISPLAY");
    if (!display || display[0] != ':' || strlen(display) > 16 || strchr(display, '/')) return run(CAPTURE_TOOL, argv);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    snprintf(address.sun_path, sizeof address.sun_path, "/tmp/.corral-screenshot-%s", display + 1);
    int server = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (server < 0 || connect(server, (struct sockaddr *)&address, sizeof address)) return run(CAPTURE_TOOL, argv);
    int file = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (file < 0) { perror(path); return 1; }
    char request = pointer ? 'p' : 'n';
    struct iovec part = {.iov_base = &request, .iov_len = 1};
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr message = {.msg_iov = &part, .msg_iovlen = 1, .msg_control = control.space,
                             .msg_controllen = sizeof control.space};
    struct cmsghdr *rights = CMSG_FIRSTHDR(&message);
    rights->cmsg_level = SOL_SOCKET;
    rights->cmsg_type = SCM_RIGHTS;
    rights->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(rights), &file, sizeof(int));
    struct timeval limit = {.tv_sec = 10};
    setsockopt(server, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    char reply[512];
    ssize_t got = -1;
    if (sendmsg(server, &message, MSG_NOSIGNAL) == 1) got = recv(server, reply, sizeof reply - 1, 0);
    if (got < 1) {  /* the server went away (its X server was replaced) or hung: capture here instead */
        close(server);
        close(file);
        return run(CAPTURE_TOOL, argv);
    }
    if (reply[0] != 0) {
        reply[got] = 0;
        fprintf(stderr, "scrot: %s\n", reply + 1);
        return 1;
    }
    return 0;
}
