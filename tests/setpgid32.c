/* One i386 setpgid (57, which is x86_64's fork), then a pause the test looks during. Built -m32, the
 * 32-bit libc's call; built 64-bit with -DINT80, through `int $0x80`. Usage: setpgid32 SECONDS */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
#ifdef INT80
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(57L), "b"(0L), "c"(0L) : "memory");
#else
    setpgid(0, 0);
#endif
    usleep((useconds_t)(atof(argc > 1 ? argv[1] : "2") * 1e6));
    return 0;
}
