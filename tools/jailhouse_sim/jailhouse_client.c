/*
 * The simulator's `jailhouse` command as a small C program: <sim root>/bin/jailhouse.
 *
 * `jailhouse-sim up` compiles it with `cc`, so a call costs what a board's C tool costs
 * instead of a Python interpreter start. It is a relay, not a second implementation:
 * it sends its arguments, the path it was run as, its working directory and PATH to the
 * simulator daemon, which runs the tool's grammar and output (jailhouse_client.py) for
 * it, and replays the answer: stdout and stderr bytes, then the exit status, or a helper
 * to exec (`cell linux`). Without a daemon to answer, or when the daemon asks for it, it
 * execs the Python client (<root>/libexec/jailhouse-sim/jailhouse.py), which also works
 * with no daemon. <root> is two levels above this executable (/proc/self/exe).
 *
 * Wire format: see relay.py. Plain C99 + POSIX, plus Linux's getauxval(AT_EXECFN).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define PYTHON_CLIENT "/libexec/jailhouse-sim/jailhouse.py"
#define SOCKET_PATH "/run/jailhouse-sim.sock"
#define MAGIC "\0JHC1"
#define MAGIC_LEN 5
#define OPENING_LOST "opening /dev/jailhouse: No such file or directory\n"
#define MAX_FRAME (64u * 1024 * 1024)

static char root[PATH_MAX];
static const char *execfn;

/* The simulator root: the directory above the one this executable is in. */
static int find_root(void)
{
	ssize_t n = readlink("/proc/self/exe", root, sizeof(root) - 1);
	char *slash;
	int level;

	if (n <= 0)
		return -1;
	root[n] = '\0';
	for (level = 0; level < 2; level++) {
		slash = strrchr(root, '/');
		if (slash == NULL)
			return -1;
		*slash = '\0';
	}
	return 0;
}

/* Run the Python client in this process instead, with our arguments; it names the tool
   by JAILHOUSE_SIM_EXECFN (the path we were run as), as if it had been run itself. */
static void run_python_client(int argc, char **argv)
{
	char path[PATH_MAX];
	char **args = calloc((size_t)(argc > 1 ? argc : 1) + 1, sizeof(char *));
	int i;

	if (args == NULL || (size_t)snprintf(path, sizeof(path), "%s%s", root, PYTHON_CLIENT) >= sizeof(path)) {
		fprintf(stderr, "jailhouse: cannot run the Python client\n");
		exit(1);
	}
	args[0] = path;
	for (i = 1; i < argc; i++)
		args[i] = argv[i];
	setenv("JAILHOUSE_SIM_EXECFN", execfn, 1);
	execv(path, args);
	fprintf(stderr, "jailhouse: cannot run %s: %s\n", path, strerror(errno));
	exit(1);
}

static int connect_daemon(void)
{
	struct sockaddr_un addr;
	int fd;

	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	if ((size_t)snprintf(addr.sun_path, sizeof(addr.sun_path), "%s%s", root, SOCKET_PATH)
	    >= sizeof(addr.sun_path))
		return -1;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void put_u32(unsigned char *p, uint32_t value)
{
	p[0] = (unsigned char)(value >> 24);
	p[1] = (unsigned char)(value >> 16);
	p[2] = (unsigned char)(value >> 8);
	p[3] = (unsigned char)value;
}

static uint32_t get_u32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Send all n bytes of buf; -1 if the daemon went away. */
static int send_full(int fd, const unsigned char *buf, size_t n)
{
	ssize_t sent;

	while (n > 0) {
		sent = send(fd, buf, n, MSG_NOSIGNAL);
		if (sent < 0 && errno == EINTR)
			continue;
		if (sent <= 0)
			return -1;
		buf += sent;
		n -= (size_t)sent;
	}
	return 0;
}

/* The request: MAGIC, length, then execfn, cwd, PATH and argv[1..] as C strings. */
static int send_request(int fd, int argc, char **argv, const char *cwd)
{
	const char *path = getenv("PATH");
	const char *fields[3];
	size_t length = 0, off = MAGIC_LEN + 4, n;
	unsigned char *buf;
	int i, rc;

	fields[0] = execfn;
	fields[1] = cwd;
	fields[2] = path ? path : "";
	for (i = 0; i < 3; i++)
		length += strlen(fields[i]) + 1;
	for (i = 1; i < argc; i++)
		length += strlen(argv[i]) + 1;
	if (length > UINT32_MAX || (buf = malloc(off + length)) == NULL)
		return -1;
	memcpy(buf, MAGIC, MAGIC_LEN);
	put_u32(buf + MAGIC_LEN, (uint32_t)length);
	for (i = 0; i < 3; i++) {
		n = strlen(fields[i]) + 1;
		memcpy(buf + off, fields[i], n);
		off += n;
	}
	for (i = 1; i < argc; i++) {
		n = strlen(argv[i]) + 1;
		memcpy(buf + off, argv[i], n);
		off += n;
	}
	rc = send_full(fd, buf, off);
	free(buf);
	return rc;
}

/* Read exactly n bytes; 0 on success, -1 on EOF or error. */
static int read_full(int fd, void *buf, size_t n)
{
	size_t got = 0;
	ssize_t r;

	while (got < n) {
		r = read(fd, (char *)buf + got, n - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		got += (size_t)r;
	}
	return 0;
}

static void write_full(int fd, const char *buf, size_t n)
{
	ssize_t w;

	while (n > 0) {
		w = write(fd, buf, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			exit(1); /* as the Python client: a failed write ends the run, status 1 */
		buf += w;
		n -= (size_t)w;
	}
}

/* Copy a frame's n payload bytes from the daemon to out_fd; -1 if the daemon went away. */
static int copy_payload(int fd, int out_fd, uint32_t n)
{
	char buf[65536];
	size_t chunk;

	while (n > 0) {
		chunk = n < sizeof(buf) ? n : sizeof(buf);
		if (read_full(fd, buf, chunk) < 0)
			return -1;
		write_full(out_fd, buf, chunk);
		n -= (uint32_t)chunk;
	}
	return 0;
}

/* Exec the helper an 'X' frame names: PATH value, file, argv... (payload NUL-terminated). */
static void exec_helper(char *payload, uint32_t n)
{
	char **fields = calloc((size_t)n + 1, sizeof(char *));
	size_t count = 0;
	uint32_t i, start = 0;

	for (i = 0; fields != NULL && i < n; i++) {
		if (payload[i] == '\0') {
			fields[count++] = payload + start;
			start = i + 1;
		}
	}
	if (count < 3) {
		fprintf(stderr, "jailhouse: malformed exec request from the simulator\n");
		exit(1);
	}
	fields[count] = NULL;
	setenv("PATH", fields[0], 1);
	execvp(fields[1], fields + 2);
	fprintf(stderr, "execvp: %s\n", strerror(errno));
	exit(1);
}

/* Replay the daemon's frames until the exit status (or an exec / hand-over). */
static int relay(int fd, int argc, char **argv)
{
	unsigned char head[5];
	char *payload, lost[512] = "";
	uint32_t n;
	int seen = 0;

	for (;;) {
		if (read_full(fd, head, sizeof(head)) < 0)
			break;
		seen = 1;
		n = get_u32(head + 1);
		if (head[0] == 'o' || head[0] == 'e') {
			if (copy_payload(fd, head[0] == 'o' ? STDOUT_FILENO : STDERR_FILENO, n) < 0)
				break;
			continue;
		}
		if (n > MAX_FRAME || (payload = malloc((size_t)n + 1)) == NULL)
			break;
		if (read_full(fd, payload, n) < 0)
			break;
		payload[n] = '\0';
		if (head[0] == 'c')
			snprintf(lost, sizeof(lost), "%s", payload);
		else if (head[0] == 'r')
			snprintf(lost, sizeof(lost), "%s", OPENING_LOST);
		else if (head[0] == 'x')
			return n >= 4 ? (int)(get_u32((unsigned char *)payload) & 0xff) : 1;
		else if (head[0] == 'X')
			exec_helper(payload, n);
		else if (head[0] == 'F')
			run_python_client(argc, argv);
		free(payload);
	}
	/* The daemon vanished: before it said anything, the Python client does the whole call
	   (it needs no daemon for some commands); after, say what the Python client would. */
	if (!seen)
		run_python_client(argc, argv);
	write_full(STDERR_FILENO, lost, strlen(lost));
	return 1;
}

static void on_sigint(int sig)
{
	(void)sig;
	_exit(1); /* the Python client's KeyboardInterrupt: status 1 */
}

/* As Python: SIGINT ends the run with status 1 unless it was ignored; SIGPIPE is ignored. */
static void set_signals(void)
{
	struct sigaction old, sa;

	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGINT, NULL, &old) == 0 && old.sa_handler == SIG_DFL) {
		sa.sa_handler = on_sigint;
		sigaction(SIGINT, &sa, NULL);
	}
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
}

int main(int argc, char **argv)
{
	char cwd[PATH_MAX];
	int fd;

	set_signals();
	execfn = (const char *)(uintptr_t)getauxval(AT_EXECFN);
	if (execfn == NULL)
		execfn = argv[0] ? argv[0] : "jailhouse";
	if (find_root() < 0) {
		fprintf(stderr, "jailhouse: cannot find the simulator root from /proc/self/exe\n");
		return 1;
	}
	if (getcwd(cwd, sizeof(cwd)) == NULL)
		run_python_client(argc, argv);
	fd = connect_daemon();
	if (fd < 0 || send_request(fd, argc, argv, cwd) < 0)
		run_python_client(argc, argv);
	return relay(fd, argc, argv);
}
