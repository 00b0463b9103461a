/* STAND-IN (pack18, not committed): only the fallback of the protocol, until warm18's client. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    (void)argc;
    char self[PATH_MAX + 4];
    if (realpath("/proc/self/exe", self) == NULL) {
        dprintf(2, "block-xenblockctl: cannot resolve /proc/self/exe: %s\n", strerror(errno));
        return 1;
    }
    strcat(self, ".py");
    argv[0] = self;
    execv(self, argv);
    dprintf(2, "block-xenblockctl: cannot run %s: %s\n", self, strerror(errno));
    return 1;
}
