/*
 * vc-agent: the virtcontainers guest agent.
 *
 * One static C file, libc only, so it starts in milliseconds even under TCG. It serves the
 * framed, versioned protocol described in docs/agent-protocol.md over one byte stream:
 *
 *   --serial NAME|PATH   a virtio-serial port (default: the port named "vc.agent")
 *   --vsock PORT         AF_VSOCK listener (also the guest side of hybrid vsock)
 *   --unix PATH          unix socket listener (host-side tests run the agent this way)
 *
 * Single-threaded: one poll() loop over the channel, a signalfd for SIGCHLD and the pipes/pty of
 * every running exec. All fds are non-blocking; nothing in the loop blocks except short file I/O
 * and the fork/exec handshake. Flow control is credit based in both directions (see the doc), so
 * a child that never reads stdin or a host that stops reading output can never stall the loop.
 *
 * Build: gcc -static -O2 -Wall -o vc-agent vc-agent.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "0.1.0"
#define PROTO_MAJOR 1
#define PROTO_MINOR 3

#define HDR_SIZE 24
#define MAX_PAYLOAD 65536u
#define WINDOW (256u * 1024u) /* initial credit per exec and direction */
#define ACK_STEP (WINDOW / 4u)
#define CHUNK 32768u           /* largest output data frame we produce */
#define OUT_HIGH (4u << 20)    /* channel output backlog that pauses all reading */
#define MAX_EXECS 1024
#define MAX_ITEMS 65536 /* argv + env entries per exec */
#define SERIAL_RETRY_MS 20
/* How long a virtio-serial port must stay hung up before the host counts as gone. The guest
 * kernel applies the host's open/close notices from a work queue, after the data that may
 * follow them: a host that has just reconnected can have its request handled while the port
 * still reports the previous host's hangup, and dropping the reply then would leave the new
 * host waiting forever. */
#define SERIAL_HANGUP_GRACE_MS 3000

static const uint8_t MAGIC[4] = {'V', 'C', 'A', 'G'};

enum frame_type {
    T_PING = 0x01,
    T_EXEC = 0x02,
    T_SIGNAL = 0x03,
    T_WRITE_FILE = 0x04,
    T_READ_FILE = 0x05,
    T_ONLINE_CPUS = 0x06,
    T_ONLINE_MEMORY = 0x07,
    T_SHUTDOWN = 0x08,
    T_ATTACH = 0x09,
    T_RESIZE = 0x0A,
    T_MOUNT = 0x0B, /* since 1.3 */
    T_OK = 0x40,
    T_ERROR = 0x41,
    T_STDIN = 0x80,
    T_STDOUT = 0x81,
    T_STDERR = 0x82,
    T_EXIT = 0x83,
    T_WINDOW = 0x84,
};

#define F_EOF 0x0001

enum tag {
    G_ARG = 1, G_ENV = 2, G_CWD = 3, G_UID = 4, G_GID = 5, G_TTY = 6, G_TIMEOUT_MS = 7,
    G_EXEC_ID = 8, G_SIGNAL = 9, G_PATH = 10, G_MODE = 11, G_OFFSET = 12, G_DATA = 13,
    G_FINAL = 14, G_LENGTH = 15, G_SIZE = 16, G_EOF = 17, G_COUNT = 18, G_PROTO_MAJOR = 19,
    G_PROTO_MINOR = 20, G_AGENT_VERSION = 21, G_EXIT_CODE = 22, G_TIMED_OUT = 23,
    G_ERR_CODE = 24, G_ERRNO = 25, G_MESSAGE = 26, G_GROUP = 27, G_FAILED = 28, G_ROWS = 29,
    G_COLS = 30, G_PID = 31, G_CLEAR_ENV = 32, G_NO_STDIN = 33, G_DIRECT = 34,
    /* since 1.3 (the OCI runtime): */
    G_SOURCE = 35, G_FSTYPE = 36, G_MOUNT_FLAGS = 37, G_MOUNT_DATA = 38, G_GROUPS = 39,
    G_RLIMITS = 40, G_UMASK = 41, G_PARENTS = 42,
    G_MAX = 43,
};
#define G_CRITICAL 0x8000

/* 0: bytes/string, else fixed width in bytes */
static const uint8_t TAG_WIDTH[G_MAX] = {
    [G_UID] = 4, [G_GID] = 4, [G_TTY] = 1, [G_TIMEOUT_MS] = 4, [G_EXEC_ID] = 4, [G_SIGNAL] = 4,
    [G_MODE] = 4, [G_OFFSET] = 8, [G_FINAL] = 1, [G_LENGTH] = 4, [G_SIZE] = 8, [G_EOF] = 1,
    [G_COUNT] = 4, [G_PROTO_MAJOR] = 4, [G_PROTO_MINOR] = 4, [G_EXIT_CODE] = 4,
    [G_TIMED_OUT] = 1, [G_ERR_CODE] = 4, [G_ERRNO] = 4, [G_GROUP] = 1, [G_FAILED] = 4,
    [G_ROWS] = 4, [G_COLS] = 4, [G_PID] = 4, [G_CLEAR_ENV] = 1, [G_NO_STDIN] = 1, [G_DIRECT] = 1,
    [G_MOUNT_FLAGS] = 4, [G_UMASK] = 4, [G_PARENTS] = 1,
};

enum err_code {
    E_BAD_TYPE = 1, E_TOO_LARGE = 2, E_BAD_PAYLOAD = 3, E_BAD_VERSION = 4, E_NOT_FOUND = 5,
    E_OS = 6, E_EXEC = 7, E_LIMIT = 8,
};

enum transport { TR_SERIAL, TR_VSOCK, TR_UNIX };

/* ------------------------------------------------------------------ utilities */

static int verbose;
static const char *sysfs_root = "/sys";

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, "vc-agent: ", 10);
    w = write(2, line, (size_t)n);
    (void)w;
}

static void die(const char *what) __attribute__((noreturn));
static void die(const char *what)
{
    logmsg("fatal: %s: %s", what, strerror(errno));
    exit(1);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        errno = ENOMEM;
        die("realloc");
    }
    return q;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        errno = ENOMEM;
        die("malloc");
    }
    return p;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* CRC-32/ISO-HDLC, the same as zlib.crc32 */
static uint32_t crc32_of(const uint8_t *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) << 32 | rd32(p + 4); }
static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static void wr64(uint8_t *p, uint64_t v) { wr32(p, (uint32_t)(v >> 32)); wr32(p + 4, (uint32_t)v); }

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* A byte queue: data lives in d[off, off+len). */
struct buf {
    uint8_t *d;
    size_t off, len, cap;
};

static void buf_reserve(struct buf *b, size_t extra)
{
    if (b->off + b->len + extra <= b->cap)
        return;
    if (b->off) { /* compact only when the tail is too short */
        memmove(b->d, b->d + b->off, b->len);
        b->off = 0;
    }
    if (b->len + extra <= b->cap)
        return;
    size_t nc = b->cap ? b->cap : 4096;
    while (nc < b->len + extra)
        nc *= 2;
    b->d = xrealloc(b->d, nc);
    b->cap = nc;
}

static void buf_append(struct buf *b, const void *p, size_t n)
{
    if (!n)
        return;
    buf_reserve(b, n);
    memcpy(b->d + b->off + b->len, p, n);
    b->len += n;
}

static void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        b->off = b->len = 0;
        if (b->cap > (1u << 20)) { /* give big transient buffers back */
            free(b->d);
            b->d = NULL;
            b->cap = 0;
        }
        return;
    }
    b->off += n;
    b->len -= n;
}

static void buf_free(struct buf *b)
{
    free(b->d);
    memset(b, 0, sizeof *b);
}

/* ------------------------------------------------------------------ channel output */

static enum transport transport = TR_SERIAL;
static int listen_fd = -1;
static int chan_fd = -1;
static int host_up; /* serial: we believe a host is attached; sockets: connected */
static int64_t serial_retry_at;
static int64_t serial_hangup_since; /* serial, host_up: first hangup seen since the last I/O */
static struct buf chan_in, chan_out;
static uint64_t garbage_bytes;

static void send_frame(uint8_t type, uint16_t flags, uint32_t id, const uint8_t *p, size_t n)
{
    if (chan_fd < 0 || !host_up)
        return; /* nobody listens: the frame would be stale on the next connection */
    uint8_t h[HDR_SIZE];
    memcpy(h, MAGIC, 4);
    h[4] = PROTO_MAJOR;
    h[5] = type;
    wr16(h + 6, flags);
    wr32(h + 8, id);
    wr32(h + 12, (uint32_t)n);
    wr32(h + 16, crc32_of(p, n));
    wr32(h + 20, crc32_of(h, 20));
    buf_append(&chan_out, h, HDR_SIZE);
    buf_append(&chan_out, p, n);
}

/* TLV builder for replies (one at a time: the agent is single-threaded) */
static struct buf tb;

static void tb_reset(void) { tb.off = tb.len = 0; }
static void tb_raw(uint16_t tag, const void *p, size_t n)
{
    uint8_t h[6];
    wr16(h, tag);
    wr32(h + 2, (uint32_t)n);
    buf_append(&tb, h, 6);
    buf_append(&tb, p, n);
}
static void tb_u8(uint16_t tag, uint8_t v) { tb_raw(tag, &v, 1); }
static void tb_u32(uint16_t tag, uint32_t v)
{
    uint8_t b[4];
    wr32(b, v);
    tb_raw(tag, b, 4);
}
static void tb_u64(uint16_t tag, uint64_t v)
{
    uint8_t b[8];
    wr64(b, v);
    tb_raw(tag, b, 8);
}
static void tb_str(uint16_t tag, const char *s) { tb_raw(tag, s, strlen(s)); }
static void tb_send(uint8_t type, uint32_t id) { send_frame(type, 0, id, tb.d + tb.off, tb.len); }

static void send_error(uint32_t id, uint32_t code, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void send_error(uint32_t id, uint32_t code, int err, const char *fmt, ...)
{
    char msg[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (verbose)
        logmsg("error reply id=%u code=%u: %s", id, code, msg);
    if (!id)
        return;
    tb_reset();
    tb_u32(G_ERR_CODE, code);
    if (err)
        tb_u32(G_ERRNO, (uint32_t)err);
    tb_str(G_MESSAGE, msg);
    tb_send(T_ERROR, id);
}

/* ------------------------------------------------------------------ request fields */

struct fields {
    char **args, **envs;
    int nargs, nenvs;
    char *cwd, *path, *source, *fstype, *mount_data, *groups, *rlimits;
    int has_uid, has_gid, has_mode, tty, group, final, clear_env, no_stdin, direct;
    int has_umask, parents;
    uint32_t uid, gid, timeout_ms, exec_id, sig, mode, length, rows, cols, mount_flags, umask;
    uint64_t offset;
    const uint8_t *data;
    uint32_t data_len;
    char *arena;
};

static void fields_free(struct fields *f)
{
    free(f->args);
    free(f->envs);
    free(f->arena);
    memset(f, 0, sizeof *f);
}

static int is_string_tag(uint16_t tag)
{
    return tag == G_ARG || tag == G_ENV || tag == G_CWD || tag == G_PATH || tag == G_SOURCE ||
           tag == G_FSTYPE || tag == G_MOUNT_DATA || tag == G_GROUPS || tag == G_RLIMITS;
}

/* Parse a TLV payload. Returns 0, or -1 with a message in err. Strings are copied into one
 * arena with a terminating NUL; strings containing NUL are rejected (they would be truncated
 * silently by every libc call). */
static int parse_fields(const uint8_t *p, uint32_t n, struct fields *f, char *err, size_t errlen)
{
    memset(f, 0, sizeof *f);
    int nargs = 0, nenvs = 0;
    size_t strbytes = 0;
    for (size_t off = 0; off < n;) { /* pass 1: validate and count */
        if (n - off < 6) {
            snprintf(err, errlen, "truncated TLV header at offset %zu", off);
            return -1;
        }
        uint16_t tag = rd16(p + off);
        uint32_t len = rd32(p + off + 2);
        if (len > n - off - 6) {
            snprintf(err, errlen, "TLV tag %u length %u overruns the payload", tag, len);
            return -1;
        }
        const uint8_t *v = p + off + 6;
        off += 6 + (size_t)len;
        if (tag >= G_MAX || tag == 0) {
            if (tag & G_CRITICAL) {
                snprintf(err, errlen, "unknown critical tag 0x%04x", tag);
                return -1;
            }
            continue; /* unknown optional field from a newer minor version */
        }
        if (TAG_WIDTH[tag] && len != TAG_WIDTH[tag]) {
            snprintf(err, errlen, "tag %u must be %u bytes, got %u", tag, TAG_WIDTH[tag], len);
            return -1;
        }
        if (is_string_tag(tag)) {
            if (memchr(v, 0, len)) {
                snprintf(err, errlen, "string tag %u contains a NUL byte", tag);
                return -1;
            }
            strbytes += (size_t)len + 1;
            if (tag == G_ARG)
                nargs++;
            if (tag == G_ENV)
                nenvs++;
            if (nargs + nenvs > MAX_ITEMS) {
                snprintf(err, errlen, "more than %d argv/env entries", MAX_ITEMS);
                return -1;
            }
        }
    }
    f->args = xmalloc(sizeof(char *) * (size_t)(nargs + 1));
    f->envs = xmalloc(sizeof(char *) * (size_t)(nenvs + 1));
    f->arena = xmalloc(strbytes + 1);
    char *a = f->arena;
    for (size_t off = 0; off < n;) { /* pass 2: fill */
        uint16_t tag = rd16(p + off);
        uint32_t len = rd32(p + off + 2);
        const uint8_t *v = p + off + 6;
        off += 6 + (size_t)len;
        char *s = NULL;
        if (is_string_tag(tag)) {
            memcpy(a, v, len);
            a[len] = 0;
            s = a;
            a += len + 1;
        }
        switch (tag) {
        case G_ARG: f->args[f->nargs++] = s; break;
        case G_ENV: f->envs[f->nenvs++] = s; break;
        case G_CWD: f->cwd = s; break;
        case G_PATH: f->path = s; break;
        case G_UID: f->has_uid = 1; f->uid = rd32(v); break;
        case G_GID: f->has_gid = 1; f->gid = rd32(v); break;
        case G_TTY: f->tty = v[0] != 0; break;
        case G_TIMEOUT_MS: f->timeout_ms = rd32(v); break;
        case G_EXEC_ID: f->exec_id = rd32(v); break;
        case G_SIGNAL: f->sig = rd32(v); break;
        case G_GROUP: f->group = v[0] != 0; break;
        case G_MODE: f->has_mode = 1; f->mode = rd32(v); break;
        case G_OFFSET: f->offset = rd64(v); break;
        case G_DATA: f->data = v; f->data_len = len; break;
        case G_FINAL: f->final = v[0] != 0; break;
        case G_LENGTH: f->length = rd32(v); break;
        case G_ROWS: f->rows = rd32(v); break;
        case G_COLS: f->cols = rd32(v); break;
        case G_CLEAR_ENV: f->clear_env = v[0] != 0; break;
        case G_NO_STDIN: f->no_stdin = v[0] != 0; break;
        case G_DIRECT: f->direct = v[0] != 0; break;
        case G_SOURCE: f->source = s; break;
        case G_FSTYPE: f->fstype = s; break;
        case G_MOUNT_DATA: f->mount_data = s; break;
        case G_MOUNT_FLAGS: f->mount_flags = rd32(v); break;
        case G_GROUPS: f->groups = s; break;
        case G_RLIMITS: f->rlimits = s; break;
        case G_UMASK: f->has_umask = 1; f->umask = rd32(v); break;
        case G_PARENTS: f->parents = v[0] != 0; break;
        default: break;
        }
    }
    f->args[f->nargs] = NULL;
    f->envs[f->nenvs] = NULL;
    return 0;
}

/* ------------------------------------------------------------------ execs */

struct exec {
    uint32_t id;
    pid_t pid;
    int tty;
    int in_fd, out_fd, err_fd; /* with a tty, in_fd == out_fd == the pty master */
    struct buf inbuf;          /* stdin bytes not yet accepted by the child */
    uint32_t ack;              /* stdin bytes consumed but not yet credited to the host */
    uint32_t out_credit;       /* output bytes we may still send */
    int stdin_eof, stdin_eof_done;
    uint8_t last_in;
    int exited, status, timed_out, orphan, done;
    int64_t deadline;
};

static struct exec *execs[MAX_EXECS];
static int nexecs;
static uint32_t next_exec_id = 1;
extern char **environ;

static struct exec *find_exec(uint32_t id)
{
    for (int i = 0; i < nexecs; i++)
        if (execs[i]->id == id && !execs[i]->done)
            return execs[i];
    return NULL;
}

static void send_window(uint32_t id, uint32_t n)
{
    uint8_t b[4];
    wr32(b, n);
    send_frame(T_WINDOW, 0, id, b, 4);
}

static void exec_flush_ack(struct exec *e, int force)
{
    if (e->ack && (force || e->ack >= ACK_STEP || !e->inbuf.len)) {
        if (!e->orphan)
            send_window(e->id, e->ack);
        e->ack = 0;
    }
}

/* Stdin can take no more: drop what is buffered, credit it back so the host never blocks. */
static void exec_stdin_gone(struct exec *e)
{
    e->ack += (uint32_t)e->inbuf.len;
    buf_free(&e->inbuf);
    e->stdin_eof = e->stdin_eof_done = 1;
    if (!e->tty && e->in_fd >= 0) {
        close(e->in_fd);
        e->in_fd = -1;
    }
    exec_flush_ack(e, 1);
}

static void exec_write_stdin(struct exec *e)
{
    while (e->in_fd >= 0 && e->inbuf.len) {
        size_t n = e->inbuf.len > 65536 ? 65536 : e->inbuf.len;
        ssize_t w = write(e->in_fd, e->inbuf.d + e->inbuf.off, n);
        if (w > 0) {
            e->last_in = e->inbuf.d[e->inbuf.off + (size_t)w - 1];
            buf_consume(&e->inbuf, (size_t)w);
            e->ack += (uint32_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        exec_stdin_gone(e); /* EPIPE, EIO: the reader is gone */
        return;
    }
    if (e->in_fd >= 0 && !e->inbuf.len && e->stdin_eof && !e->stdin_eof_done) {
        if (e->tty) {
            /* A pty has no half-close: send VEOF like a terminal user would. After a partial
             * line the first ^D only flushes the line, so send a second one. */
            const char *eof = e->last_in && e->last_in != '\n' ? "\x04\x04" : "\x04";
            ssize_t w = write(e->in_fd, eof, strlen(eof));
            (void)w;
        } else {
            close(e->in_fd);
            e->in_fd = -1;
        }
        e->stdin_eof_done = 1;
    }
    exec_flush_ack(e, 0);
}

static void exec_close_out(struct exec *e, int which)
{
    if (e->tty) {
        if (e->out_fd >= 0)
            close(e->out_fd);
        e->out_fd = e->in_fd = -1;
        buf_free(&e->inbuf);
        return;
    }
    int *fd = which == 1 ? &e->out_fd : &e->err_fd;
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

enum { R_DATA, R_AGAIN, R_EOF, R_NOCREDIT };

static uint8_t scratch[MAX_PAYLOAD];

static int exec_read_out(struct exec *e, int which)
{
    int fd = which == 1 ? e->out_fd : e->err_fd;
    if (fd < 0)
        return R_EOF;
    size_t want = CHUNK;
    if (!e->orphan && want > e->out_credit)
        want = e->out_credit;
    if (!want)
        return R_NOCREDIT;
    ssize_t r = read(fd, scratch, want);
    if (r > 0) {
        if (!e->orphan) {
            send_frame(which == 1 ? T_STDOUT : T_STDERR, 0, e->id, scratch, (size_t)r);
            e->out_credit -= (uint32_t)r;
        }
        return R_DATA;
    }
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return R_AGAIN;
    exec_close_out(e, which); /* EOF, or EIO from a pty master whose slave is gone */
    return R_EOF;
}

static void exec_send_exit(struct exec *e)
{
    tb_reset();
    if (WIFEXITED(e->status))
        tb_u32(G_EXIT_CODE, (uint32_t)WEXITSTATUS(e->status));
    if (WIFSIGNALED(e->status))
        tb_u32(G_SIGNAL, (uint32_t)WTERMSIG(e->status));
    if (e->timed_out)
        tb_u8(G_TIMED_OUT, 1);
    tb_send(T_EXIT, e->id);
}

/* After the child was reaped everything it wrote is already in the pipe: read until EAGAIN
 * (or EOF), then report the exit. Output of background grandchildren after that is dropped. */
static void exec_progress(struct exec *e)
{
    if (e->done || !e->exited)
        return;
    for (int which = 1; which <= 2; which++) {
        for (;;) {
            int r = exec_read_out(e, which);
            if (r == R_DATA)
                continue;
            if (r == R_AGAIN)
                exec_close_out(e, which);
            break;
        }
    }
    if (e->in_fd >= 0 || e->inbuf.len)
        exec_stdin_gone(e);
    if (e->out_fd < 0 && e->err_fd < 0) {
        if (!e->orphan)
            exec_send_exit(e);
        e->done = 1;
    }
}

static void exec_free(struct exec *e)
{
    if (e->tty) {
        if (e->out_fd >= 0)
            close(e->out_fd);
    } else {
        if (e->in_fd >= 0)
            close(e->in_fd);
        if (e->out_fd >= 0)
            close(e->out_fd);
        if (e->err_fd >= 0)
            close(e->err_fd);
    }
    buf_free(&e->inbuf);
    free(e);
}

static const char *unix_path;

static void reap_children(int sfd)
{
    struct signalfd_siginfo si;
    while (read(sfd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) {
            /* leave no stale socket behind; children keep running like after any exit */
            if (unix_path)
                unlink(unix_path);
            logmsg("terminated by signal %u", si.ssi_signo);
            exit(0);
        }
    }
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p <= 0)
            break;
        for (int i = 0; i < nexecs; i++) {
            if (execs[i]->pid == p && !execs[i]->exited) {
                execs[i]->exited = 1;
                execs[i]->status = st;
            }
        }
    }
}

/* Child side of exec: never returns. Reports (stage, errno) on the CLOEXEC pipe on failure. */
static void child_fail(int efd, int stage)
{
    int msg[2] = {stage, errno};
    ssize_t w = write(efd, msg, sizeof msg);
    (void)w;
    _exit(127);
}

static const char *env_lookup(char **envp, const char *name)
{
    size_t n = strlen(name);
    for (; *envp; envp++)
        if (!strncmp(*envp, name, n) && (*envp)[n] == '=')
            return *envp + n + 1;
    return NULL;
}

/* RLIMITS: "RESOURCE:SOFT:HARD[,...]" with Linux resource numbers (the host maps names). */
static int apply_rlimits(const char *spec)
{
    for (const char *p = spec; *p;) {
        char *end;
        unsigned long res = strtoul(p, &end, 10);
        if (*end != ':')
            return errno = EINVAL, -1;
        struct rlimit rl;
        rl.rlim_cur = (rlim_t)strtoull(end + 1, &end, 10);
        if (*end != ':')
            return errno = EINVAL, -1;
        rl.rlim_max = (rlim_t)strtoull(end + 1, &end, 10);
        if (setrlimit((int)res, &rl) < 0)
            return -1;
        p = *end == ',' ? end + 1 : end + strlen(end);
    }
    return 0;
}

static void child_exec(struct fields *f, char **envp, int efd, int in, int out, int err, int tty)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL); /* SIG_IGN (SIGPIPE) would survive execve */
    if (setsid() < 0)
        child_fail(efd, 1);
    if (tty && ioctl(in, TIOCSCTTY, 0) < 0)
        child_fail(efd, 2);
    if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0)
        child_fail(efd, 3);
    if (f->cwd && chdir(f->cwd) < 0)
        child_fail(efd, 4);
    if (f->rlimits && apply_rlimits(f->rlimits) < 0)
        child_fail(efd, 8);
    if (f->has_umask)
        umask((mode_t)(f->umask & 0777));
    if (f->has_gid) {
        gid_t g[NGROUPS_MAX + 1];
        int n = 0;
        g[n++] = (gid_t)f->gid;
        for (const char *p = f->groups; p && *p && n <= NGROUPS_MAX;) {
            char *end;
            g[n++] = (gid_t)strtoul(p, &end, 10);
            p = *end == ',' ? end + 1 : end + strlen(end);
        }
        if (setgroups((size_t)n, g) < 0 || setgid(g[0]) < 0)
            child_fail(efd, 5);
    }
    if (f->has_uid && setuid((uid_t)f->uid) < 0)
        child_fail(efd, 6);
    const char *file = f->args[0];
    if (strchr(file, '/')) {
        execve(file, f->args, envp);
        child_fail(efd, 7);
    }
    const char *path = env_lookup(envp, "PATH");
    if (!path)
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    int saved = ENOENT;
    char full[PATH_MAX];
    while (*path) {
        const char *end = strchr(path, ':');
        size_t dl = end ? (size_t)(end - path) : strlen(path);
        if (dl + strlen(file) + 2 <= sizeof full) {
            if (dl) {
                memcpy(full, path, dl);
                full[dl] = '/';
                strcpy(full + dl + 1, file);
            } else {
                strcpy(full, file);
            }
            execve(full, f->args, envp);
            if (errno == EACCES)
                saved = EACCES;
            else if (errno != ENOENT && errno != ENOTDIR)
                saved = errno;
        }
        if (!end)
            break;
        path = end + 1;
    }
    errno = saved;
    child_fail(efd, 7);
}

#include "vc-rootfs.h" /* the container root of image sandboxes */

static const char *STAGES[] = {"", "setsid", "set controlling tty", "dup2", "chdir", "setgid",
                               "setuid", "execve", "setrlimit"};

static void do_exec(uint32_t id, struct fields *f)
{
    if (nexecs >= MAX_EXECS) {
        send_error(id, E_LIMIT, 0, "too many running execs (%d)", MAX_EXECS);
        return;
    }
    if (!f->nargs) {
        send_error(id, E_BAD_PAYLOAD, 0, "exec: argv is empty");
        return;
    }
    if (rootfs_refuse(id))
        return;
    int cin = -1, cout = -1, cerr = -1; /* child ends */
    int pin = -1, pout = -1, perr = -1; /* our ends */
    int p[2];
    if (f->tty) {
        int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        char name[128];
        if (m < 0 || grantpt(m) < 0 || unlockpt(m) < 0 || ptsname_r(m, name, sizeof name)) {
            int err = errno;
            if (m >= 0)
                close(m);
            send_error(id, E_OS, err, "openpty: %s", strerror(err));
            return;
        }
        int s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (s < 0) {
            int err = errno;
            close(m);
            send_error(id, E_OS, err, "open %s: %s", name, strerror(err));
            return;
        }
        if (f->rows && f->cols) {
            struct winsize ws = {.ws_row = (unsigned short)f->rows,
                                 .ws_col = (unsigned short)f->cols};
            ioctl(m, TIOCSWINSZ, &ws);
        }
        set_nonblock(m);
        pin = pout = m;
        cin = cout = cerr = s;
    } else {
        int ok = 1;
        if (pipe2(p, O_CLOEXEC) == 0) { cin = p[0]; pin = p[1]; } else ok = 0;
        if (ok && pipe2(p, O_CLOEXEC) == 0) { pout = p[0]; cout = p[1]; } else ok = 0;
        if (ok && pipe2(p, O_CLOEXEC) == 0) { perr = p[0]; cerr = p[1]; } else ok = 0;
        if (!ok) {
            int err = errno;
            int fds[] = {cin, pin, cout, pout, cerr, perr};
            for (int i = 0; i < 6; i++)
                if (fds[i] >= 0)
                    close(fds[i]);
            send_error(id, E_OS, err, "pipe: %s", strerror(err));
            return;
        }
        set_nonblock(pin);
        set_nonblock(pout);
        set_nonblock(perr);
    }
    int ep[2];
    if (pipe2(ep, O_CLOEXEC) < 0) {
        int err = errno;
        ep[0] = ep[1] = -1;
        send_error(id, E_OS, err, "pipe: %s", strerror(err));
        goto fail_fds;
    }
    char **envp = (f->clear_env || f->nenvs) ? f->envs : environ;
    pid_t pid = fork();
    if (pid < 0) {
        int err = errno;
        send_error(id, E_OS, err, "fork: %s", strerror(err));
        close(ep[0]);
        close(ep[1]);
        goto fail_fds;
    }
    if (pid == 0)
        child_exec(f, envp, ep[1], cin, cout, cerr, f->tty);
    close(ep[1]);
    int msg[2];
    ssize_t r;
    do { /* blocks only until the child's execve (or its failure) closes the pipe */
        r = read(ep[0], msg, sizeof msg);
    } while (r < 0 && errno == EINTR);
    close(ep[0]);
    if (r == (ssize_t)sizeof msg) {
        int st;
        waitpid(pid, &st, 0);
        int stage = msg[0] >= 1 && msg[0] <= 8 ? msg[0] : 7;
        const char *what = stage == 4 ? f->cwd : f->args[0];
        send_error(id, E_EXEC, msg[1], "%s %s: %s", STAGES[stage], what, strerror(msg[1]));
        goto fail_fds;
    }
    close(cin);
    if (!f->tty) {
        close(cout);
        close(cerr);
    }
    struct exec *e = xmalloc(sizeof *e);
    memset(e, 0, sizeof *e);
    e->id = next_exec_id++;
    if (!next_exec_id)
        next_exec_id = 1;
    e->pid = pid;
    e->tty = f->tty;
    e->in_fd = pin;
    e->out_fd = pout;
    e->err_fd = f->tty ? -1 : perr;
    e->out_credit = WINDOW;
    e->deadline = f->timeout_ms ? now_ms() + f->timeout_ms : 0;
    execs[nexecs++] = e;
    tb_reset();
    tb_u32(G_EXEC_ID, e->id);
    tb_u32(G_PID, (uint32_t)pid);
    tb_send(T_OK, id);
    if (f->no_stdin) {
        e->stdin_eof = 1;
        exec_write_stdin(e);
    }
    if (verbose)
        logmsg("exec %u pid %d: %s", e->id, pid, f->args[0]);
    return;
fail_fds:
    if (f->tty) {
        close(pin);
        close(cin);
    } else {
        int fds[] = {cin, pin, cout, pout, cerr, perr};
        for (int i = 0; i < 6; i++)
            close(fds[i]);
    }
}

/* ------------------------------------------------------------------ other requests */

static void do_signal(uint32_t id, struct fields *f)
{
    struct exec *e = find_exec(f->exec_id);
    if (!e || e->orphan) {
        send_error(id, E_NOT_FOUND, 0, "no exec with id %u", f->exec_id);
        return;
    }
    if (!f->sig || f->sig >= NSIG) {
        send_error(id, E_BAD_PAYLOAD, 0, "bad signal number %u", f->sig);
        return;
    }
    if (!e->exited && kill(f->group ? -e->pid : e->pid, (int)f->sig) < 0) {
        int err = errno;
        send_error(id, E_OS, err, "kill: %s", strerror(err));
        return;
    }
    tb_reset();
    tb_send(T_OK, id);
}

/* RESIZE (since 1.2): a new window size for an exec's pty; the kernel then sends SIGWINCH to
 * the pty's foreground process group, as a terminal emulator's resize does. */
static void do_resize(uint32_t id, struct fields *f)
{
    struct exec *e = find_exec(f->exec_id);
    if (!e || e->orphan) {
        send_error(id, E_NOT_FOUND, 0, "no exec with id %u", f->exec_id);
        return;
    }
    if (!e->tty) {
        send_error(id, E_BAD_PAYLOAD, 0, "exec %u has no tty", f->exec_id);
        return;
    }
    if (!f->rows || !f->cols || f->rows > 0xffff || f->cols > 0xffff) {
        send_error(id, E_BAD_PAYLOAD, 0, "bad window size %ux%u", f->rows, f->cols);
        return;
    }
    struct winsize ws = {.ws_row = (unsigned short)f->rows, .ws_col = (unsigned short)f->cols};
    if (e->in_fd >= 0 && ioctl(e->in_fd, TIOCSWINSZ, &ws) < 0) {
        int err = errno;
        send_error(id, E_OS, err, "TIOCSWINSZ: %s", strerror(err));
        return;
    }
    tb_reset();
    tb_send(T_OK, id);
}

static int write_all(int fd, const uint8_t *p, size_t n, uint64_t off)
{
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* WRITE_FILE and READ_FILE need a path, and a container root that is not broken; 1 when
 * the request was refused (the error is sent). */
static int file_request_refused(uint32_t id, struct fields *f, const char *op)
{
    if (!f->path || !f->path[0]) {
        send_error(id, E_BAD_PAYLOAD, 0, "%s: path is missing", op);
        return 1;
    }
    return rootfs_refuse(id);
}

static void do_write_file(uint32_t id, struct fields *f)
{
    if (file_request_refused(id, f, "write_file"))
        return;
    mode_t mode = f->has_mode ? (mode_t)(f->mode & 07777) : 0644;
    /* Atomic by default: chunks go to "<path>.vc-part", the final chunk renames it. */
    char tmp[PATH_MAX];
    const char *target = f->path;
    if (!f->direct) {
        if ((size_t)snprintf(tmp, sizeof tmp, "%s.vc-part", f->path) >= sizeof tmp) {
            send_error(id, E_OS, ENAMETOOLONG, "write_file %s: %s", f->path,
                       strerror(ENAMETOOLONG));
            return;
        }
        target = tmp;
    }
    if (f->parents && f->offset == 0) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", f->path);
        char *slash = strrchr(dir, '/');
        if (slash && slash != dir) {
            *slash = 0;
            if (mkdir_p(dir, 0755) < 0) {
                int err = errno;
                send_error(id, E_OS, err, "write_file %s: mkdir %s: %s", f->path, dir,
                           strerror(err));
                return;
            }
        }
    }
    int flags = O_WRONLY | O_CLOEXEC | O_NOCTTY;
    if (f->offset == 0)
        flags |= O_CREAT | O_TRUNC;
    int fd = open(target, flags, mode);
    if (fd < 0) {
        int err = errno;
        send_error(id, E_OS, err, "write_file %s: open: %s", target, strerror(err));
        return;
    }
    int err = 0;
    const char *step = "write";
    if (f->data_len && write_all(fd, f->data, f->data_len, f->offset) < 0)
        err = errno;
    if (!err && f->final && !f->direct && fchmod(fd, mode) < 0) {
        err = errno;
        step = "chmod";
    }
    if (close(fd) < 0 && !err) {
        err = errno;
        step = "close";
    }
    if (!err && f->final && !f->direct && rename(tmp, f->path) < 0) {
        err = errno;
        step = "rename";
    }
    if (err) {
        if (!f->direct)
            unlink(tmp);
        send_error(id, E_OS, err, "write_file %s: %s: %s", f->path, step, strerror(err));
        return;
    }
    tb_reset();
    tb_send(T_OK, id);
}

static void do_read_file(uint32_t id, struct fields *f)
{
    if (file_request_refused(id, f, "read_file"))
        return;
    uint32_t want = f->length ? f->length : CHUNK;
    if (want > MAX_PAYLOAD - 64)
        want = MAX_PAYLOAD - 64;
    int fd = open(f->path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        int err = errno;
        send_error(id, E_OS, err, "read_file %s: %s", f->path, strerror(err));
        return;
    }
    struct stat st;
    int serr = fstat(fd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    if (serr) {
        int err = serr;
        close(fd);
        send_error(id, E_OS, err, "read_file %s: %s", f->path, strerror(err));
        return;
    }
    size_t got = 0;
    while (got < want) {
        ssize_t r = pread(fd, scratch + got, want - got, (off_t)(f->offset + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int err = errno;
            close(fd);
            send_error(id, E_OS, err, "read_file %s: %s", f->path, strerror(err));
            return;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    tb_reset();
    tb_u64(G_SIZE, (uint64_t)st.st_size);
    tb_u8(G_EOF, got < want);
    tb_raw(G_DATA, scratch, got);
    tb_send(T_OK, id);
}

/* Read a small sysfs attribute into buf (NUL-terminated, trailing newline stripped). */
static int read_attr(const char *path, char *buf, size_t n)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t r = read(fd, buf, n - 1);
    close(fd);
    if (r < 0)
        return -1;
    buf[r] = 0;
    while (r > 0 && (buf[r - 1] == '\n' || buf[r - 1] == ' '))
        buf[--r] = 0;
    return 0;
}

static int write_attr(const char *path, const char *val)
{
    /* O_TRUNC as a shell's `echo 1 > online`: sysfs ignores it, a plain file (the mock
     * driver's guest sysfs) then holds the value alone */
    int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, val, strlen(val));
    int err = errno;
    close(fd);
    errno = err;
    return w == (ssize_t)strlen(val) ? 0 : -1;
}

/* Online every offline entry "<prefix>N/<attr>" below dir. */
static void do_online(uint32_t id, const char *sub, const char *prefix, const char *attr,
                      const char *offline, const char *online)
{
    char dir[PATH_MAX], path[PATH_MAX], val[64];
    snprintf(dir, sizeof dir, "%s/%s", sysfs_root, sub);
    DIR *d = opendir(dir);
    if (!d) {
        int err = errno;
        send_error(id, E_OS, err, "%s: %s", dir, strerror(err));
        return;
    }
    uint32_t count = 0, failed = 0;
    size_t pl = strlen(prefix);
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *n = de->d_name;
        if (strncmp(n, prefix, pl) || !n[pl] || strspn(n + pl, "0123456789") != strlen(n + pl))
            continue;
        if ((size_t)snprintf(path, sizeof path, "%s/%s/%s", dir, n, attr) >= sizeof path)
            continue;
        if (read_attr(path, val, sizeof val) < 0 || strcmp(val, offline))
            continue; /* cpu0 usually has no "online" file: it cannot go offline */
        if (write_attr(path, online) == 0) {
            count++;
        } else {
            failed++;
            logmsg("%s: %s", path, strerror(errno));
        }
    }
    closedir(d);
    tb_reset();
    tb_u32(G_COUNT, count);
    tb_u32(G_FAILED, failed);
    tb_send(T_OK, id);
}

static int no_poweroff;

static void flush_blocking(int64_t budget_ms)
{
    int64_t end = now_ms() + budget_ms;
    while (chan_out.len && chan_fd >= 0) {
        ssize_t w = write(chan_fd, chan_out.d + chan_out.off, chan_out.len);
        if (w > 0) {
            buf_consume(&chan_out, (size_t)w);
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            break;
        int64_t left = end - now_ms();
        if (left <= 0)
            break;
        struct pollfd pfd = {.fd = chan_fd, .events = POLLOUT};
        poll(&pfd, 1, (int)left);
    }
}

/* The serial console's driver sends queued output from interrupts, and power-off does not wait
 * for it: without this the last lines on the console (ours, and any an exec wrote there) can
 * be lost, or cut by the kernel's own power-down message. Bounded, in case nothing drains. */
static void drain_console(void)
{
    int64_t end = now_ms() + 2000;
    int queued = 0;
    while (ioctl(2, TIOCOUTQ, &queued) == 0 && queued > 0 && now_ms() < end)
        usleep(5000);
}

static void do_shutdown(uint32_t id)
{
    sync();
    tb_reset();
    tb_send(T_OK, id);
    flush_blocking(2000);
    for (int i = 0; i < nexecs; i++)
        if (!execs[i]->exited)
            kill(-execs[i]->pid, SIGKILL);
    if (no_poweroff) {
        logmsg("shutdown requested: exiting (--no-poweroff)");
        exit(0);
    }
    logmsg("shutdown requested: powering off");
    drain_console();
    reboot(RB_POWER_OFF);
    die("reboot");
}

/* ------------------------------------------------------------------ dispatch */

static void handle_stdin(uint32_t id, uint16_t flags, const uint8_t *p, uint32_t n)
{
    struct exec *e = find_exec(id);
    if (!e)
        return; /* raced with the exit: the host stops sending after the EXIT frame */
    if (e->in_fd < 0 || e->stdin_eof || e->exited) {
        e->ack += n; /* nobody will read it: drop, but credit it back */
        exec_flush_ack(e, 1);
        return;
    }
    if (e->inbuf.len + n > WINDOW) {
        logmsg("exec %u: host exceeded its stdin window; %u bytes dropped", id, n);
        return;
    }
    buf_append(&e->inbuf, p, n);
    if (flags & F_EOF)
        e->stdin_eof = 1;
    exec_write_stdin(e);
}

/* Execs of a host that left lose their stdio: stdin is closed, output is read and dropped, the
 * exit is not reported. A tty session gets the hangup a terminal would send. */
static void orphan_execs(void)
{
    for (int i = 0; i < nexecs; i++) {
        struct exec *e = execs[i];
        if (e->done || e->orphan)
            continue;
        e->orphan = 1;
        if (e->tty && !e->exited)
            kill(-e->pid, SIGHUP);
        exec_stdin_gone(e);
    }
}

/* ATTACH starts a new host's session. On virtio-serial the previous host may have left without
 * the agent seeing a lasting hangup, so what it left behind goes now: its execs and the output
 * still queued for it. The sync preamble before ATTACH is expected garbage; only the rest is
 * worth a line on the console. */
static void host_attached(void)
{
    uint64_t preamble = HDR_SIZE + MAX_PAYLOAD;
    uint64_t extra = garbage_bytes > preamble ? garbage_bytes - preamble : 0;
    if (extra)
        logmsg("skipped %llu bytes of garbage", (unsigned long long)extra);
    if (verbose)
        logmsg("new host session");
    garbage_bytes = 0;
    buf_free(&chan_out);
    orphan_execs();
}

static void handle_frame(uint8_t type, uint16_t flags, uint32_t id, const uint8_t *p, uint32_t n)
{
    if (type == T_STDIN) {
        handle_stdin(id, flags, p, n);
        return;
    }
    if (type == T_WINDOW) {
        struct exec *e = find_exec(id);
        if (e && n == 4) {
            uint64_t c = (uint64_t)e->out_credit + rd32(p);
            e->out_credit = c > (1u << 30) ? (1u << 30) : (uint32_t)c;
        }
        return;
    }
    if (type == T_ATTACH) {
        host_attached();
        return;
    }
    if (type < T_PING || type > T_MOUNT) {
        send_error(id, E_BAD_TYPE, 0, "unknown frame type 0x%02x", type);
        return;
    }
    if (!id) {
        logmsg("request type 0x%02x without a request id ignored", type);
        return;
    }
    struct fields f;
    char err[256];
    if (parse_fields(p, n, &f, err, sizeof err) < 0) {
        send_error(id, E_BAD_PAYLOAD, 0, "%s", err);
        fields_free(&f);
        return;
    }
    switch (type) {
    case T_PING:
        tb_reset();
        tb_u32(G_PROTO_MAJOR, PROTO_MAJOR);
        tb_u32(G_PROTO_MINOR, PROTO_MINOR);
        tb_str(G_AGENT_VERSION, AGENT_VERSION);
        tb_send(T_OK, id);
        break;
    case T_EXEC: do_exec(id, &f); break;
    case T_SIGNAL: do_signal(id, &f); break;
    case T_WRITE_FILE: do_write_file(id, &f); break;
    case T_READ_FILE: do_read_file(id, &f); break;
    case T_ONLINE_CPUS:
        do_online(id, "devices/system/cpu", "cpu", "online", "0", "1");
        break;
    case T_ONLINE_MEMORY:
        do_online(id, "devices/system/memory", "memory", "state", "offline", "online");
        break;
    case T_SHUTDOWN: do_shutdown(id); break;
    case T_RESIZE: do_resize(id, &f); break;
    case T_MOUNT: do_mount(id, &f); break;
    default: break;
    }
    fields_free(&f);
}

/* Offset of the first byte that may start a frame: a full magic, or a magic prefix at the end. */
static size_t find_magic(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        const uint8_t *v = memchr(p + i, MAGIC[0], n - i);
        if (!v)
            return n;
        i = (size_t)(v - p);
        size_t k = n - i < 4 ? n - i : 4;
        if (!memcmp(p + i, MAGIC, k))
            return i;
        i++;
    }
    return n;
}

static void parse_input(void)
{
    for (;;) {
        uint8_t *p = chan_in.d + chan_in.off;
        size_t n = chan_in.len;
        size_t skip = find_magic(p, n);
        if (skip) {
            garbage_bytes += skip;
            buf_consume(&chan_in, skip);
            continue;
        }
        if (n < HDR_SIZE)
            return;
        if (crc32_of(p, 20) != rd32(p + 20)) { /* not a header: resync one byte later */
            garbage_bytes++;
            buf_consume(&chan_in, 1);
            continue;
        }
        uint8_t version = p[4], type = p[5];
        uint16_t flags = rd16(p + 6);
        uint32_t id = rd32(p + 8), len = rd32(p + 12), pcrc = rd32(p + 16);
        if (len > MAX_PAYLOAD) {
            send_error(id, E_TOO_LARGE, 0, "frame payload of %u bytes exceeds %u", len,
                       MAX_PAYLOAD);
            garbage_bytes += HDR_SIZE;
            buf_consume(&chan_in, HDR_SIZE); /* its payload is scanned as garbage */
            continue;
        }
        if (n < HDR_SIZE + (size_t)len)
            return;
        if (crc32_of(p + HDR_SIZE, len) != pcrc) {
            /* Corrupt, or a stale frame cut short by a host reconnect and completed by the
             * resync padding. No reply: the id may belong to a previous host. */
            garbage_bytes++;
            buf_consume(&chan_in, 1);
            continue;
        }
        if (version != PROTO_MAJOR) {
            if (id) {
                tb_reset();
                tb_u32(G_ERR_CODE, E_BAD_VERSION);
                tb_u32(G_PROTO_MAJOR, PROTO_MAJOR);
                tb_u32(G_PROTO_MINOR, PROTO_MINOR);
                char msg[96];
                snprintf(msg, sizeof msg, "agent speaks protocol %d, frame has version %u",
                         PROTO_MAJOR, version);
                tb_str(G_MESSAGE, msg);
                tb_send(T_ERROR, id);
            }
        } else {
            handle_frame(type, flags, id, p + HDR_SIZE, len);
        }
        buf_consume(&chan_in, HDR_SIZE + (size_t)len);
    }
}

/* ------------------------------------------------------------------ channel */

static void host_gone(const char *why)
{
    if (verbose || transport != TR_SERIAL)
        logmsg("host disconnected (%s)", why);
    if (garbage_bytes)
        logmsg("skipped %llu bytes of garbage", (unsigned long long)garbage_bytes);
    garbage_bytes = 0;
    buf_free(&chan_in);
    buf_free(&chan_out);
    if (transport != TR_SERIAL) {
        close(chan_fd);
        chan_fd = -1;
    } else {
        serial_retry_at = now_ms() + SERIAL_RETRY_MS;
    }
    host_up = 0;
    serial_hangup_since = 0;
    orphan_execs();
}

/* Serial: the port reports no host (POLLHUP, or a read of 0 with nothing buffered). */
static void serial_hangup(const char *why)
{
    int64_t t = now_ms();
    if (host_up && !serial_hangup_since) {
        serial_hangup_since = t;
        if (verbose)
            logmsg("port hangup (%s): the host may be gone", why);
    }
    if (host_up && t - serial_hangup_since >= SERIAL_HANGUP_GRACE_MS)
        host_gone(why);
    else
        serial_retry_at = t + SERIAL_RETRY_MS;
}

static void chan_read(void)
{
    buf_reserve(&chan_in, 131072);
    size_t room = chan_in.cap - chan_in.off - chan_in.len;
    ssize_t r = read(chan_fd, chan_in.d + chan_in.off + chan_in.len, room);
    if (r > 0) {
        if (!host_up && verbose)
            logmsg("host attached");
        host_up = 1;
        serial_hangup_since = 0;
        chan_in.len += (size_t)r;
        parse_input();
        return;
    }
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (r == 0 && transport == TR_SERIAL)
        serial_hangup("EOF");
    else
        host_gone(r == 0 ? "EOF" : strerror(errno));
}

static void chan_flush(void)
{
    while (chan_fd >= 0 && chan_out.len) {
        ssize_t w = write(chan_fd, chan_out.d + chan_out.off, chan_out.len);
        if (w > 0) {
            buf_consume(&chan_out, (size_t)w);
            serial_hangup_since = 0;
            continue;
        }
        if (w < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        host_gone(w < 0 ? strerror(errno) : "write returned 0");
        return;
    }
}

static void accept_host(void)
{
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    chan_fd = fd;
    host_up = 1;
    if (verbose)
        logmsg("host connected");
}

static int open_serial(const char *name)
{
    if (name[0] == '/') {
        int fd = open(name, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            die(name);
        return fd;
    }
    /* The port's device node can show up a little after the module loaded: retry ~10 s. */
    char dir[PATH_MAX], path[PATH_MAX], val[256];
    snprintf(dir, sizeof dir, "%s/class/virtio-ports", sysfs_root);
    for (int attempt = 0; attempt < 200; attempt++) {
        DIR *d = opendir(dir);
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (de->d_name[0] == '.')
                continue;
            if ((size_t)snprintf(path, sizeof path, "%s/%s/name", dir, de->d_name) >= sizeof path)
                continue;
            if (read_attr(path, val, sizeof val) < 0 || strcmp(val, name))
                continue;
            snprintf(path, sizeof path, "/dev/%s", de->d_name);
            int fd = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
            if (fd >= 0) {
                closedir(d);
                return fd;
            }
        }
        if (d)
            closedir(d);
        usleep(50000);
    }
    logmsg("fatal: no virtio-serial port named %s below %s", name, dir);
    exit(1);
}

static int listen_on(const char *what, const char *arg)
{
    int fd;
    if (!arg) {
        logmsg("fatal: no %s address", what);
        exit(2);
    }
    if (!strcmp(what, "unix")) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(arg) >= sizeof sa.sun_path) {
            logmsg("fatal: socket path too long: %s", arg);
            exit(2);
        }
        /* Bind and listen under a temporary name, then rename: a client that waits for the
         * path to appear never connects between bind() and listen() (ECONNREFUSED). */
        char tmp[sizeof sa.sun_path + 16];
        snprintf(tmp, sizeof tmp, "%s.%d", arg, (int)getpid());
        if (strlen(tmp) >= sizeof sa.sun_path)
            snprintf(tmp, sizeof tmp, "%s", arg);
        strcpy(sa.sun_path, tmp);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
            die("socket");
        unlink(tmp);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die(arg);
        if (listen(fd, 4) < 0)
            die("listen");
        if (strcmp(tmp, arg) && rename(tmp, arg) < 0)
            die(arg);
        return fd;
    } else {
        char *end;
        unsigned long port = strtoul(arg, &end, 10);
        if (*end || port > 0xFFFFFFFFul) {
            logmsg("fatal: bad vsock port %s", arg);
            exit(2);
        }
        struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                 .svm_port = (unsigned)port};
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
            die("socket(AF_VSOCK)");
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die("bind(AF_VSOCK)");
    }
    if (listen(fd, 4) < 0)
        die("listen");
    return fd;
}

/* Without a transport on argv, the kernel command line may name one (the guest init runs us
 * without arguments): vc.agent=serial:NAME, vc.agent=vsock or vc.agent=vsock:PORT;
 * vc.agent.verbose=1 logs connection events to the console. */
static void options_from_cmdline(const char *path, const char **serial, const char **vsock_port)
{
    static char line[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t r = read(fd, line, sizeof line - 1);
    close(fd);
    if (r <= 0)
        return;
    line[r] = 0;
    for (char *tok = strtok(line, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
        if (!strcmp(tok, "vc.agent.verbose=1"))
            verbose = 1;
        rootfs_option(tok);
        if (strncmp(tok, "vc.agent=", 9))
            continue;
        const char *v = tok + 9;
        if (!strcmp(v, "vsock")) {
            transport = TR_VSOCK;
            *vsock_port = "1024";
        } else if (!strncmp(v, "vsock:", 6) && v[6]) {
            transport = TR_VSOCK;
            *vsock_port = v + 6;
        } else if (!strncmp(v, "serial:", 7) && v[7]) {
            transport = TR_SERIAL;
            *serial = v + 7;
        } else {
            logmsg("ignoring unknown %s", tok);
        }
    }
}

/* ------------------------------------------------------------------ main loop */

enum { K_SIG, K_CHAN, K_LISTEN, K_EXEC_IN, K_EXEC_OUT, K_EXEC_ERR };

static void usage(void)
{
    fprintf(stderr, "usage: vc-agent [--serial NAME|PATH | --vsock PORT | --unix PATH]\n"
                    "                [--sysfs-root DIR] [--cmdline FILE] [--no-poweroff]\n"
                    "                [--verbose] [--version]\n"
                    "Without a transport option: vc.agent=serial:NAME|vsock[:PORT] from the\n"
                    "kernel command line, else the virtio-serial port named vc.agent;\n"
                    "vc.agent.verbose=1 there logs connection events.\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *serial = "vc.agent", *vsock_port = NULL;
    const char *cmdline = "/proc/cmdline";
    int chosen = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--serial") && i + 1 < argc) {
            serial = argv[++i];
            transport = TR_SERIAL;
            chosen = 1;
        } else if (!strcmp(a, "--vsock") && i + 1 < argc) {
            vsock_port = argv[++i];
            transport = TR_VSOCK;
            chosen = 1;
        } else if (!strcmp(a, "--unix") && i + 1 < argc) {
            unix_path = argv[++i];
            transport = TR_UNIX;
            chosen = 1;
        } else if (!strcmp(a, "--cmdline") && i + 1 < argc) {
            cmdline = argv[++i];
        } else if (!strcmp(a, "--sysfs-root") && i + 1 < argc) {
            sysfs_root = argv[++i];
        } else if (!strcmp(a, "--no-poweroff")) {
            no_poweroff = 1;
        } else if (!strcmp(a, "--verbose")) {
            verbose = 1;
        } else if (!strcmp(a, "--version")) {
            printf("vc-agent %s protocol %d.%d\n", AGENT_VERSION, PROTO_MAJOR, PROTO_MINOR);
            return 0;
        } else {
            usage();
        }
    }
    if (!chosen)
        options_from_cmdline(cmdline, &serial, &vsock_port);
    /* init may start us with fds 0-2 closed: keep pipes and sockets off them */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            break;
    crc_init();
    if (rootfs_mode)
        rootfs_setup(); /* a failure is kept in rootfs_error and reported per request */
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
        die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0)
        die("signalfd");

    if (transport == TR_UNIX) {
        listen_fd = listen_on("unix", unix_path);
    } else if (transport == TR_VSOCK) {
        listen_fd = listen_on("vsock", vsock_port);
    } else {
        chan_fd = open_serial(serial);
        if (isatty(chan_fd)) { /* a console-like port: no echo, no line discipline */
            struct termios t;
            if (tcgetattr(chan_fd, &t) == 0) {
                cfmakeraw(&t);
                tcsetattr(chan_fd, TCSANOW, &t);
            }
        }
        host_up = 1; /* until the port tells us otherwise */
    }
    logmsg("ready: version %s protocol %d.%d on %s", AGENT_VERSION, PROTO_MAJOR, PROTO_MINOR,
           transport == TR_UNIX ? unix_path : transport == TR_VSOCK ? "vsock" : serial);

    struct pollfd *pfds = xmalloc(sizeof *pfds * (3 + 2 * MAX_EXECS));
    struct { int kind; struct exec *e; } *refs = xmalloc(sizeof *refs * (3 + 2 * MAX_EXECS));
    for (;;) {
        int n = 0;
        int64_t now = now_ms();
        int timeout = -1;
        pfds[n] = (struct pollfd){.fd = sfd, .events = POLLIN};
        refs[n].e = NULL;
        refs[n++].kind = K_SIG;
        int chan_busy = chan_out.len >= OUT_HIGH;
        if (chan_fd >= 0) {
            short ev = 0;
            if (!chan_busy)
                ev |= POLLIN;
            if (chan_out.len)
                ev |= POLLOUT;
            if (transport == TR_SERIAL && (!host_up || serial_hangup_since)) {
                /* A port without a host reports POLLHUP constantly: look again later. */
                if (now < serial_retry_at) {
                    ev = 0;
                    timeout = (int)(serial_retry_at - now);
                } else {
                    ev = POLLIN | (host_up && chan_out.len ? POLLOUT : 0);
                }
            }
            if (ev) {
                pfds[n] = (struct pollfd){.fd = chan_fd, .events = ev};
                refs[n].e = NULL;
                refs[n++].kind = K_CHAN;
            }
        } else if (listen_fd >= 0) {
            pfds[n] = (struct pollfd){.fd = listen_fd, .events = POLLIN};
            refs[n].e = NULL;
            refs[n++].kind = K_LISTEN;
        }
        for (int i = 0; i < nexecs; i++) {
            struct exec *e = execs[i];
            int can_out = !chan_busy && (e->orphan || e->out_credit > 0);
            if (e->deadline && !e->exited && !e->timed_out) {
                int64_t left = e->deadline - now;
                if (left < 0)
                    left = 0;
                if (timeout < 0 || left < timeout)
                    timeout = (int)left;
            }
            if (e->tty) {
                /* one pty master carries both directions */
                short ev = 0;
                if (e->out_fd >= 0 && can_out)
                    ev |= POLLIN;
                if (e->in_fd >= 0 && e->inbuf.len)
                    ev |= POLLOUT;
                if (ev) {
                    pfds[n] = (struct pollfd){.fd = e->out_fd, .events = ev};
                    refs[n].kind = K_EXEC_OUT;
                    refs[n++].e = e;
                }
                continue;
            }
            if (e->in_fd >= 0 && e->inbuf.len) {
                pfds[n] = (struct pollfd){.fd = e->in_fd, .events = POLLOUT};
                refs[n].kind = K_EXEC_IN;
                refs[n++].e = e;
            }
            if (e->out_fd >= 0 && can_out) {
                pfds[n] = (struct pollfd){.fd = e->out_fd, .events = POLLIN};
                refs[n].kind = K_EXEC_OUT;
                refs[n++].e = e;
            }
            if (e->err_fd >= 0 && can_out) {
                pfds[n] = (struct pollfd){.fd = e->err_fd, .events = POLLIN};
                refs[n].kind = K_EXEC_ERR;
                refs[n++].e = e;
            }
        }
        int r = poll(pfds, (nfds_t)n, timeout);
        if (r < 0 && errno != EINTR)
            die("poll");
        for (int i = 0; r > 0 && i < n; i++) {
            short re = pfds[i].revents;
            if (!re)
                continue;
            struct exec *e = refs[i].e;
            switch (refs[i].kind) {
            case K_SIG: reap_children(sfd); break;
            case K_LISTEN: accept_host(); break;
            case K_CHAN:
                if (transport == TR_SERIAL && (re & POLLHUP) && !(re & POLLIN)) {
                    serial_hangup("POLLHUP");
                    break;
                }
                if (re & (POLLIN | POLLHUP | POLLERR))
                    chan_read();
                if (chan_fd >= 0 && (re & POLLOUT))
                    chan_flush();
                break;
            case K_EXEC_IN:
                if (!e->done)
                    exec_write_stdin(e);
                break;
            case K_EXEC_OUT:
                if (e->done)
                    break;
                if (e->tty && (re & POLLOUT))
                    exec_write_stdin(e);
                if (re & (POLLIN | POLLHUP | POLLERR))
                    exec_read_out(e, 1);
                break;
            case K_EXEC_ERR:
                if (!e->done)
                    exec_read_out(e, 2);
                break;
            default: break;
            }
        }
        now = now_ms();
        int w = 0;
        for (int i = 0; i < nexecs; i++) {
            struct exec *e = execs[i];
            if (e->deadline && !e->exited && !e->timed_out && now >= e->deadline) {
                e->timed_out = 1;
                kill(-e->pid, SIGKILL); /* the whole process group: setsid() made it ours */
            }
            exec_progress(e);
            if (e->done)
                exec_free(e);
            else
                execs[w++] = e;
        }
        nexecs = w;
        chan_flush();
    }
}
