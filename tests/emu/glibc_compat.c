/* glibc_compat.c - for tests/emu: the bochscpu-python 0.4.0 wheel (tagged manylinux_2_28)
 * references two unversioned glibc >= 2.38 symbols, the C23 variants; this provides them
 * on an older glibc (Debian 12: 2.36). C23 differs only in accepting "0b" prefixes. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
unsigned long long __isoc23_strtoull(const char *s, char **e, int base)
{
    return strtoull(s, e, base);
}
int __isoc23_sscanf(const char *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = vsscanf(s, fmt, ap);
    va_end(ap);
    return r;
}
