/* Built -m32: one i386 setpgid (57, which is x86_64's fork), then a pause the test looks during.
 * Usage: setpgid32 SECONDS */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    setpgid(0, 0);
    usleep((useconds_t)(atof(argc > 1 ? argv[1] : "2") * 1e6));
    return 0;
}
