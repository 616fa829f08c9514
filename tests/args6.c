/* Syscalls whose details need the fourth to sixth arguments (r10, r8, r9 on x86_64): openat's mode,
 * sendto's address and its length, linkat's newpath and flags; and umount2, whose trace event is named
 * sys_exit_umount. Usage: args6 PATH PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    char linked[4096];
    snprintf(linked, sizeof(linked), "%s.link", argv[1]);
    int fd = openat(AT_FDCWD, argv[1], O_CREAT | O_WRONLY, 0640);
    if (fd < 0)
        return 1;
    close(fd);
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    if (sendto(sock, "xyz", 3, MSG_DONTWAIT, (struct sockaddr *)&to, sizeof(to)) != 3)
        return 1;
    close(sock);
    if (linkat(AT_FDCWD, argv[1], AT_FDCWD, linked, AT_SYMLINK_FOLLOW) != 0)
        return 1;
    unlink(linked);
    umount2(argv[1], MNT_DETACH); /* not a mount point: fails, and is still a syscall with details */
    return 0;
}
