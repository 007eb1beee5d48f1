/*
 * Make the disk fail or hang on demand, for real, under an unmodified server:
 *
 *     gcc -shared -fPIC -o faults.so faults.c -ldl
 *     LD_PRELOAD=./faults.so FAULTS_SUFFIX=-wal FAULTS_TRIGGER=/tmp/trigger python3 server.py ...
 *
 * While the file FAULTS_TRIGGER exists, fsync(), fdatasync(), write(), pwrite()
 * and pwrite64() on a file whose path ends with FAULTS_SUFFIX fail, doing
 * nothing. The trigger's first word is the error: "eio" (an I/O error) or
 * "enospc" (a full disk); or "hang": the call waits, as on a disk that stopped
 * answering, until the trigger is removed, then goes through. While a call
 * hangs, the file FAULTS_TRIGGER.hanging exists (a test waits for it). An
 * optional second word narrows it to the "sync" calls or the "write" calls;
 * without it both fail. Remove the file and the disk works again. Every other
 * call goes straight to the C library.
 *
 * The trigger is read at each call, not cached, so a test switches the fault
 * on and off while the server runs, between two of its commits.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

enum call_kind { SYNC_CALL, WRITE_CALL };

/* Not an errno: the call under way must wait while the trigger says so. */
#define HANG (-1)

/* The errno the call under way must fail with, HANG, or 0 to let it through. */
static int injected_error(int fd, enum call_kind kind) {
    const char *trigger = getenv("FAULTS_TRIGGER");
    const char *suffix = getenv("FAULTS_SUFFIX");
    if (trigger == NULL || suffix == NULL) {
        return 0;
    }
    int saved_errno = errno; /* a call let through must see errno as it was */
    int error = 0;
    char link[64], path[4096], word[16], calls[16];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, path, sizeof path - 1);
    size_t suffix_length = strlen(suffix);
    if (length >= 0 && (size_t)length >= suffix_length) {
        path[length] = '\0';
        if (strcmp(path + length - suffix_length, suffix) == 0) {
            /* open/read, never fopen: stdio could write, and write is ours. */
            int trigger_fd = open(trigger, O_RDONLY | O_CLOEXEC);
            if (trigger_fd >= 0) {
                char text[64] = {0};
                ssize_t got = read(trigger_fd, text, sizeof text - 1);
                close(trigger_fd);
                calls[0] = '\0';
                if (got > 0 && sscanf(text, "%15s %15s", word, calls) >= 1) {
                    int wanted = calls[0] == '\0'
                        || (kind == SYNC_CALL && strcmp(calls, "sync") == 0)
                        || (kind == WRITE_CALL && strcmp(calls, "write") == 0);
                    if (wanted && strcmp(word, "eio") == 0) {
                        error = EIO;
                    } else if (wanted && strcmp(word, "enospc") == 0) {
                        error = ENOSPC;
                    } else if (wanted && strcmp(word, "hang") == 0) {
                        error = HANG;
                    }
                }
            }
        }
    }
    errno = saved_errno;
    return error;
}

static void *next(const char *name) {
    void *function = dlsym(RTLD_NEXT, name);
    if (function == NULL) {
        abort(); /* a C library without it: nothing sensible to fall back to */
    }
    return function;
}

/* Wait while the trigger says "hang", showing it with FAULTS_TRIGGER.hanging. */
static int hang_while_injected(int fd, enum call_kind kind) {
    int error = injected_error(fd, kind);
    if (error != HANG) {
        return error;
    }
    int saved_errno = errno;
    char hanging[4096];
    snprintf(hanging, sizeof hanging, "%s.hanging", getenv("FAULTS_TRIGGER"));
    int marker = open(hanging, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (marker >= 0) {
        close(marker);
    }
    const struct timespec pause = {0, 10 * 1000 * 1000}; /* 10 ms */
    while ((error = injected_error(fd, kind)) == HANG) {
        nanosleep(&pause, NULL);
    }
    unlink(hanging);
    errno = saved_errno;
    return error;
}

#define FAIL_IF_INJECTED(fd, kind)                                                 \
    do {                                                                           \
        int error = hang_while_injected((fd), (kind));                             \
        if (error != 0) {                                                          \
            errno = error;                                                         \
            return -1;                                                             \
        }                                                                          \
    } while (0)

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = next("fsync");
    FAIL_IF_INJECTED(fd, SYNC_CALL);
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL) real = next("fdatasync");
    FAIL_IF_INJECTED(fd, SYNC_CALL);
    return real(fd);
}

ssize_t write(int fd, const void *buffer, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (real == NULL) real = next("write");
    FAIL_IF_INJECTED(fd, WRITE_CALL);
    return real(fd, buffer, count);
}

ssize_t pwrite(int fd, const void *buffer, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (real == NULL) real = next("pwrite");
    FAIL_IF_INJECTED(fd, WRITE_CALL);
    return real(fd, buffer, count, offset);
}

ssize_t pwrite64(int fd, const void *buffer, size_t count, off64_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off64_t);
    if (real == NULL) real = next("pwrite64");
    FAIL_IF_INJECTED(fd, WRITE_CALL);
    return real(fd, buffer, count, offset);
}
