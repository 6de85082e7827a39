/*
 * vc-rootfs.h: the container root of an image sandbox (included by vc-agent.c, which stays
 * the one translation unit; kept apart so the protocol code and this do not interleave).
 *
 * With vc.rootfs=tmpfs or vc.rootfs=scratch on the kernel command line the agent, before it
 * opens its channel:
 *   1. finds the image disk: a read-only virtio disk (/sys/block/vdX/ro = 1) whose superblock
 *      says erofs or ext4, and with vc.rootfs=scratch the writable ext4 disk labelled
 *      "vc-scratch"; it waits up to 10 s for them to appear;
 *   2. enters a mount namespace of its own (so the initramfs's PID 1 keeps a clean view);
 *   3. mounts the image read-only at /run/vc/image, the writable upper (tmpfs, or the scratch
 *      disk) at /run/vc/rw, and an overlay of both at /run/vc/root;
 *   4. mounts /proc, /sys, /tmp (tmpfs) and binds /dev (with /dev/pts and /dev/shm) into it,
 *      and binds /etc/hosts, /etc/resolv.conf (the initramfs's, so the network setup shows
 *      through) and a generated /etc/hostname over the image's;
 *   5. makes the overlay its root: pivot_root(2) refuses the initramfs (rootfs cannot be
 *      unmounted), so, like runc's --no-pivot, the overlay is moved onto / and chroot'ed into.
 * Every process the agent starts afterwards, and every file it reads or writes, is in the
 * container root. If a step fails, the reason is kept and every EXEC, READ_FILE and
 * WRITE_FILE is refused with it (PING still answers, so the host can report the error).
 */
#include <sched.h>
#include <sys/mount.h>

static int rootfs_mode;              /* 0 none, 1 tmpfs upper, 2 scratch-disk upper */
static char rootfs_error[256];       /* why the container root is unusable ("" = fine) */

#define RUN_VC "/run/vc"
#define ROOT_DIR RUN_VC "/root"

static void rootfs_option(const char *tok)
{
    if (!strcmp(tok, "vc.rootfs=tmpfs"))
        rootfs_mode = 1;
    else if (!strcmp(tok, "vc.rootfs=scratch"))
        rootfs_mode = 2;
}

static int rootfs_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int rootfs_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rootfs_error, sizeof rootfs_error, fmt, ap);
    va_end(ap);
    logmsg("container root: %s", rootfs_error);
    return -1;
}

/* Refuse a request while the container root is broken; 1 when refused. */
static int rootfs_refuse(uint32_t id)
{
    if (!rootfs_error[0])
        return 0;
    send_error(id, E_EXEC, 0, "container root: %s", rootfs_error);
    return 1;
}

/* What a disk's first 2 KiB say: 1 erofs, 2 ext4 (with its label copied to label). */
static int disk_kind(const char *dev, char *label, size_t n)
{
    uint8_t sb[2048];
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t r = pread(fd, sb, sizeof sb, 0);
    close(fd);
    if (r != (ssize_t)sizeof sb)
        return 0;
    const uint8_t *s = sb + 1024;
    if (s[0] == 0xe2 && s[1] == 0xe1 && s[2] == 0xf5 && s[3] == 0xe0) /* EROFS_SUPER_MAGIC_V1 */
        return 1;
    if (s[56] == 0x53 && s[57] == 0xef) { /* EXT4_SUPER_MAGIC, label at 120 */
        size_t len = strnlen((const char *)s + 120, 16);
        if (len >= n)
            len = n - 1;
        memcpy(label, s + 120, len);
        label[len] = 0;
        return 2;
    }
    return 0;
}

static int read_attr(const char *path, char *buf, size_t n); /* vc-agent.c */

/* Look once for the image disk (read-only) and the scratch disk; 0 when all are found. */
static int find_disks(char *image, int *image_kind, char *scratch, size_t n)
{
    DIR *d = opendir("/sys/block");
    if (!d)
        return -1;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strncmp(de->d_name, "vd", 2))
            continue;
        char path[PATH_MAX], ro[8] = "", label[17] = "", dev[PATH_MAX];
        snprintf(path, sizeof path, "/sys/block/%s/ro", de->d_name);
        if (read_attr(path, ro, sizeof ro) < 0)
            continue;
        snprintf(dev, sizeof dev, "/dev/%s", de->d_name);
        int kind = disk_kind(dev, label, sizeof label);
        if (ro[0] == '1' && kind && !image[0]) {
            snprintf(image, n, "%s", dev);
            *image_kind = kind;
        } else if (ro[0] == '0' && kind == 2 && !strcmp(label, "vc-scratch") && !scratch[0]) {
            snprintf(scratch, n, "%s", dev);
        }
    }
    closedir(d);
    return image[0] && (rootfs_mode != 2 || scratch[0]) ? 0 : -1;
}

static int mkdir_p(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(buf, 0755) < 0 && errno != EEXIST)
            return -1;
        *p = '/';
    }
    return mkdir(buf, mode) < 0 && errno != EEXIST ? -1 : 0;
}

/* A directory in the container root for a mount point (the image may lack it). */
static int root_dir(const char *rel, mode_t mode)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, ROOT_DIR "/%s", rel);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;
    if (lstat(path, &st) == 0 && unlink(path) < 0) /* a symlink (/tmp -> ...): replace it */
        return rootfs_fail("unlink %s: %s", path, strerror(errno));
    if (mkdir_p(path, mode) < 0)
        return rootfs_fail("mkdir %s: %s", path, strerror(errno));
    chmod(path, mode);
    return 0;
}

static int root_mount(const char *src, const char *rel, const char *type, unsigned long flags,
                      const char *data, mode_t mode)
{
    if (root_dir(rel, mode) < 0)
        return -1;
    char path[PATH_MAX];
    snprintf(path, sizeof path, ROOT_DIR "/%s", rel);
    if (mount(src, path, type, flags, data) < 0)
        return rootfs_fail("mount %s on %s: %s", src, path, strerror(errno));
    return 0;
}

/* Bind the file src over the container's /etc/<name>; a symlink or missing file there is
 * replaced by an empty regular file first (in the upper layer: the image is untouched). */
static int bind_etc(const char *src, const char *name)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, ROOT_DIR "/etc/%s", name);
    struct stat st;
    if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode) && unlink(path) < 0)
        return rootfs_fail("unlink %s: %s", path, strerror(errno));
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0)
        return rootfs_fail("create %s: %s", path, strerror(errno));
    close(fd);
    if (mount(src, path, NULL, MS_BIND, NULL) < 0)
        return rootfs_fail("bind %s on %s: %s", src, path, strerror(errno));
    return 0;
}

/* The initramfs's /etc/<name>, created with a default when the guest has none yet. */
static const char *etc_source(const char *name, const char *fallback)
{
    static char path[2][64];
    static int next;
    char *p = path[next++ & 1];
    snprintf(p, sizeof path[0], "/etc/%s", name);
    if (access(p, F_OK) < 0) {
        int fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            ssize_t w = write(fd, fallback, strlen(fallback));
            (void)w;
            close(fd);
        }
    }
    return p;
}

static int rootfs_setup(void)
{
    char image[PATH_MAX] = "", scratch[PATH_MAX] = "";
    int kind = 0;
    int64_t deadline = now_ms() + 10000;
    while (find_disks(image, &kind, scratch, sizeof image) < 0) {
        if (now_ms() > deadline)
            return rootfs_fail("no %s found after 10 s",
                               image[0] ? "scratch disk (ext4 labelled vc-scratch)"
                                        : "image disk (a read-only erofs or ext4 virtio disk)");
        usleep(10000);
    }
    if (unshare(CLONE_NEWNS) < 0)
        return rootfs_fail("unshare(CLONE_NEWNS): %s", strerror(errno));
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        return rootfs_fail("make / private: %s", strerror(errno));
    if (mkdir_p(RUN_VC "/image", 0700) < 0 || mkdir_p(RUN_VC "/rw", 0700) < 0 ||
        mkdir_p(ROOT_DIR, 0755) < 0)
        return rootfs_fail("mkdir under " RUN_VC ": %s", strerror(errno));
    const char *fstype = kind == 1 ? "erofs" : "ext4";
    if (mount(image, RUN_VC "/image", fstype, MS_RDONLY | MS_NODEV, NULL) < 0)
        return rootfs_fail("mount %s (%s) read-only: %s", image, fstype, strerror(errno));
    int up = scratch[0] ? mount(scratch, RUN_VC "/rw", "ext4", MS_NODEV, NULL)
                        : mount("tmpfs", RUN_VC "/rw", "tmpfs", MS_NODEV, "mode=0755");
    if (up < 0)
        return rootfs_fail("mount the writable upper (%s): %s", scratch[0] ? scratch : "tmpfs",
                           strerror(errno));
    if (mkdir_p(RUN_VC "/rw/upper", 0755) < 0 || mkdir_p(RUN_VC "/rw/work", 0700) < 0)
        return rootfs_fail("mkdir the overlay upper: %s", strerror(errno));
    if (mount("overlay", ROOT_DIR, "overlay", 0,
              "lowerdir=" RUN_VC "/image,upperdir=" RUN_VC "/rw/upper,workdir=" RUN_VC "/rw/work") < 0)
        return rootfs_fail("mount the overlay: %s", strerror(errno));
    if (root_mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555) < 0 ||
        root_mount("sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0555) < 0 ||
        root_mount("/dev", "dev", NULL, MS_BIND | MS_REC, NULL, 0755) < 0 ||
        root_mount("tmpfs", "tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 01777) < 0 ||
        root_dir("etc", 0755) < 0)
        return -1;
    char host[HOST_NAME_MAX + 2] = "";
    gethostname(host, sizeof host - 1);
    char hosts[sizeof host + 96];
    snprintf(hosts, sizeof hosts, "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t%s\n", host);
    int fd = open(RUN_VC "/hostname", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd >= 0) {
        strcat(host, "\n");
        ssize_t w = write(fd, host, strlen(host));
        (void)w;
        close(fd);
    }
    if (bind_etc(RUN_VC "/hostname", "hostname") < 0 ||
        bind_etc(etc_source("hosts", hosts), "hosts") < 0 ||
        bind_etc(etc_source("resolv.conf", ""), "resolv.conf") < 0)
        return -1;
    if (chdir(ROOT_DIR) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
        chdir("/") < 0)
        return rootfs_fail("enter the container root: %s", strerror(errno));
    logmsg("container root: %s (%s) under a %s upper", image, fstype,
           scratch[0] ? "scratch disk" : "tmpfs");
    return 0;
}

/*
 * MOUNT (since 1.3; the OCI runtime's mounts and read-only root, inside the container root):
 * PATH is the target, SOURCE a guest path, "LABEL=NAME" (the virtio disk whose ext4 label is
 * NAME; waited for up to 5 s) or a pseudo source ("tmpfs"); FSTYPE, MOUNT_DATA as mount(2).
 * The target is created first (with parents), as a file when M_FILE is set.
 */
#define M_RDONLY 0x1
#define M_BIND 0x2
#define M_REMOUNT 0x4
#define M_FILE 0x8
#define M_NOSUID 0x10
#define M_NODEV 0x20
#define M_NOEXEC 0x40

/* The /dev/vdX whose ext4 label is label; 0 when found. */
static int disk_by_label(const char *label, char *dev, size_t n)
{
    int64_t deadline = now_ms() + 5000;
    for (;;) {
        DIR *d = opendir("/sys/block");
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (strncmp(de->d_name, "vd", 2))
                continue;
            char path[PATH_MAX], got[17] = "";
            snprintf(path, sizeof path, "/dev/%s", de->d_name);
            if (disk_kind(path, got, sizeof got) == 2 && !strcmp(got, label)) {
                snprintf(dev, n, "%s", path);
                closedir(d);
                return 0;
            }
        }
        if (d)
            closedir(d);
        if (now_ms() > deadline)
            return -1;
        usleep(10000);
    }
}

static void do_mount(uint32_t id, struct fields *f)
{
    if (!f->path || f->path[0] != '/') {
        send_error(id, E_BAD_PAYLOAD, 0, "mount: an absolute target path is required");
        return;
    }
    if (rootfs_refuse(id))
        return;
    uint32_t m = f->mount_flags;
    char dev[PATH_MAX];
    const char *src = f->source;
    if (src && !strncmp(src, "LABEL=", 6)) {
        if (disk_by_label(src + 6, dev, sizeof dev) < 0) {
            send_error(id, E_OS, ENODEV, "mount %s: no disk labelled %s", f->path, src + 6);
            return;
        }
        src = dev;
    }
    if (!(m & M_REMOUNT)) {
        int rc;
        if (m & M_FILE) {
            char dir[PATH_MAX];
            snprintf(dir, sizeof dir, "%s", f->path);
            char *slash = strrchr(dir, '/');
            if (slash && slash != dir)
                *slash = 0;
            rc = mkdir_p(dir, 0755);
            if (rc == 0) {
                int fd = open(f->path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
                rc = fd < 0 ? -1 : close(fd);
            }
        } else {
            rc = mkdir_p(f->path, 0755);
        }
        if (rc < 0) {
            int err = errno;
            send_error(id, E_OS, err, "mount %s: create the target: %s", f->path, strerror(err));
            return;
        }
    }
    unsigned long flags = 0;
    if (m & M_NOSUID)
        flags |= MS_NOSUID;
    if (m & M_NODEV)
        flags |= MS_NODEV;
    if (m & M_NOEXEC)
        flags |= MS_NOEXEC;
    if (m & M_BIND)
        flags |= MS_BIND;
    if (m & M_REMOUNT)
        flags |= MS_REMOUNT;
    /* A bind mount ignores MS_RDONLY until it is remounted: do it in two steps. */
    int ro_later = (m & M_RDONLY) && (m & M_BIND) && !(m & M_REMOUNT);
    if ((m & M_RDONLY) && !ro_later)
        flags |= MS_RDONLY;
    if (mount(src, f->path, f->fstype && f->fstype[0] ? f->fstype : NULL, flags,
              f->mount_data && f->mount_data[0] ? f->mount_data : NULL) < 0 ||
        (ro_later && mount(NULL, f->path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)) {
        int err = errno;
        send_error(id, E_OS, err, "mount %s on %s: %s", src ? src : "-", f->path, strerror(err));
        return;
    }
    tb_reset();
    tb_send(T_OK, id);
}
