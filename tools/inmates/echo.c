/* echo: prompt "> ", send every received line back unchanged, "exit" powers off.
 * A line ends at CR or LF; the empty line a CR LF pair leaves behind is skipped. */
#include "inmate.h"

#define LINE_MAX 256

static int is_exit(const char *line, size_t length)
{
	return length == 4 && line[0] == 'e' && line[1] == 'x' && line[2] == 'i' && line[3] == 't';
}

static void send_line(const char *line, size_t length)
{
	for (size_t i = 0; i < length; i++)
		uart_put_raw(line[i]);
	uart_putc('\n');
}

int main(void)
{
	char line[LINE_MAX];
	size_t length = 0;

	print_banner("echo");
	uart_puts("echo: type a line, 'exit' powers off\n> ");
	for (;;) {
		char c = (char)uart_getc();

		if (c != '\r' && c != '\n') {
			line[length++] = c;
			if (length < LINE_MAX)
				continue;
		} else if (length == 0) {
			continue;
		}
		if (is_exit(line, length)) {
			uart_puts("echo: bye\n");
			return 0;
		}
		send_line(line, length);
		length = 0;
		uart_puts("> ");
	}
}
