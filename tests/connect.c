/* Test program: `connect ADDR PORT PATH`: opens PATH for reading, then connects a TCP socket to ADDR:PORT.
 * Built with -m32 it makes these as a 32-bit program does: openat, and socket/connect through socketcall(2). */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4)
        return 2;
    usleep(300000); /* let the agent see the exec first */
    int fd = open(argv[3], O_RDONLY);
    if (fd >= 0)
        close(fd);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1)
        return 2;
    int rc = connect(s, (struct sockaddr *)&addr, sizeof(addr));
    close(s);
    return rc == 0 ? 0 : 1;
}
