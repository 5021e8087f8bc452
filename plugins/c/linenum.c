/* linenum (WASI command in C): number the lines of stdin, like `cat -n`.
 *
 * Each line of stdin is written to stdout as "%6d\t<line>". A last line without a newline
 * is numbered too. The number of lines goes to stderr (a log line). With the input "fail",
 * it exits with status 3 to show how an exit status reaches the caller (plugin_error). */
#include <stdio.h>
#include <string.h>

int main(void) {
    char buf[4096];
    int n = 0, at_line_start = 1;
    size_t got, total = 0;
    char first[5] = {0};
    while ((got = fread(buf, 1, sizeof buf, stdin)) > 0) {
        if (total < 4) memcpy(first + total, buf, got < 4 - total ? got : 4 - total);
        for (size_t i = 0; i < got; i++) {
            if (at_line_start) {
                printf("%6d\t", ++n);
                at_line_start = 0;
            }
            putchar(buf[i]);
            if (buf[i] == '\n') at_line_start = 1;
        }
        total += got;
    }
    if (total == 4 && memcmp(first, "fail", 4) == 0) {
        fprintf(stderr, "linenum: asked to fail\n");
        return 3;
    }
    fprintf(stderr, "linenum: %d lines\n", n);
    return 0;
}
