#define _GNU_SOURCE
#include <limits.h>
#include <sys/syscall.h>
#include <unistd.h>

int close_range(unsigned int first, unsigned int last, int flags) {
    if (last > INT_MAX)
        last = INT_MAX;
    return syscall(SYS_close_range, first, last, flags);
}
