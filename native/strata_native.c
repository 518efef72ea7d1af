/*
 * strata_native: the few file syscalls Node does not expose, for core/io/native.ts.
 *
 *   seekData(fd, offset) / seekHole(fd, offset)   lseek SEEK_DATA / SEEK_HOLE, -1 on ENXIO
 *   ofdSetLock(fd, start, len, type)               fcntl F_OFD_SETLK, false on a conflict
 *   ofdGetLock(fd, start, len, type)               fcntl F_OFD_GETLK, null when free
 *   punchHole(fd, offset, len)                     fallocate PUNCH_HOLE | KEEP_SIZE
 *   zeroRange(fd, offset, len)                     fallocate ZERO_RANGE
 *   startWriteback(fd, offset, len)                sync_file_range(SYNC_FILE_RANGE_WRITE)
 *   readScan(buf, segments, unit, bitmap, cb[, outFd, outOffset, step])
 *                                                  preads into buf and a zero scan of it (and
 *                                                  writes of its data), on a thread-pool
 *                                                  thread; cb(err) when done
 *   writeQueued(fd, buf, offset, step, cb)         pwrites of buf in `step`-byte pieces, in
 *                                                  order, on the addon's writer thread;
 *                                                  cb(err) when done
 *   adviseHugePages(buf)                           madvise MADV_HUGEPAGE on buf's huge-page-
 *                                                  aligned interior; its offset in buf, or -1
 *   listXattrs(fd) / getXattr(fd, name) /          flistxattr / fgetxattr / fsetxattr: the
 *   setXattr(fd, name, value)                      extended attributes a file keeps when it
 *                                                  is replaced by a rewritten copy
 *
 * Plain C over N-API (node_api.h) so one binary loads in every Node and Electron with the
 * same N-API version. All functions but readScan and writeQueued are synchronous: each is a
 * single fast syscall. Those two are the copy loops' data path: a whole window of reads and
 * the scan of what they read in one request to libuv's pool, and writes in order on a thread
 * of the addon's own.
 * Failures throw an Error shaped like Node's own system errors: err.code = 'EAGAIN' etc.,
 * err.errno (negative, as libuv reports it), err.syscall. Bad arguments throw a TypeError.
 * Offsets and lengths are JS numbers: integers in [0, 2^53 - 1].
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64
#endif
#ifndef NAPI_VERSION
#define NAPI_VERSION 4
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <node_api.h>

#ifdef __linux__
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/xattr.h>
#endif

#define MAX_SAFE_INTEGER 9007199254740991.0

/* Returns NULL to the JS caller after an exception has been thrown. */
#define CHECK_NAPI(env, call)                                              \
  do {                                                                     \
    if ((call) != napi_ok) {                                               \
      throw_napi_failure(env, #call);                                      \
      return NULL;                                                         \
    }                                                                      \
  } while (0)

static void throw_napi_failure(napi_env env, const char *what) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) return;
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  char msg[256];
  snprintf(msg, sizeof msg, "strata_native: %s failed: %s", what,
           info && info->error_message ? info->error_message : "unknown N-API error");
  napi_throw_error(env, NULL, msg);
}

/* errno -> the symbolic name Node uses in err.code. */
static const char *errno_name(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ETXTBSY: return "ETXTBSY";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case EDEADLK: return "EDEADLK";
    case ENOLCK: return "ENOLCK";
    case ENOSYS: return "ENOSYS";
    case EOVERFLOW: return "EOVERFLOW";
#if defined(EOPNOTSUPP)
    case EOPNOTSUPP: return "EOPNOTSUPP";
#endif
#if defined(ENOTSUP) && (!defined(EOPNOTSUPP) || ENOTSUP != EOPNOTSUPP)
    case ENOTSUP: return "ENOTSUP";
#endif
#if defined(EDQUOT)
    case EDQUOT: return "EDQUOT";
#endif
#if defined(ENODATA)
    case ENODATA: return "ENODATA";
#endif
    case ERANGE: return "ERANGE";
    case E2BIG: return "E2BIG";
    default: return "UNKNOWN";
  }
}

/* Error("<CODE>: <strerror>, <syscall>") with code, errno and syscall set; NULL if N-API fails. */
static napi_value errno_error(napi_env env, int e, const char *syscall) {
  const char *code = errno_name(e);
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s, %s", code, strerror(e), syscall);
  napi_value js_code, js_msg, err, v;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &js_code) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &js_msg) != napi_ok ||
      napi_create_error(env, js_code, js_msg, &err) != napi_ok)
    return NULL;
  if (napi_create_int32(env, -e, &v) == napi_ok) napi_set_named_property(env, err, "errno", v);
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v) == napi_ok)
    napi_set_named_property(env, err, "syscall", v);
  return err;
}

/*
 * The value a callback gets for a failed request: errno_error's Error, or, should that not be
 * made (no memory), the message as a string, or the errno as a number: never null, which the
 * callback would take for success.
 */
static napi_value failure_value(napi_env env, int e, const char *syscall) {
  napi_value v = errno_error(env, e, syscall);
  if (v) return v;
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s, %s", errno_name(e), strerror(e), syscall);
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &v) == napi_ok) return v;
  if (napi_create_int32(env, e, &v) == napi_ok) return v;
  return NULL;
}

static void throw_errno(napi_env env, int e, const char *syscall) {
  napi_value err = errno_error(env, e, syscall);
  if (err) napi_throw(env, err);
  else napi_throw_error(env, errno_name(e), strerror(e));
}

static void throw_type(napi_env env, const char *code, const char *fn, const char *name,
                       const char *expected) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: \"%s\" must be %s", fn, name, expected);
  napi_throw_type_error(env, code, msg);
}

/* Reads argv[i] as an integer in [min, max]; throws a TypeError otherwise. */
static bool get_integer(napi_env env, napi_value *argv, size_t argc, size_t i, const char *fn,
                        const char *name, double min, double max, const char *expected,
                        int64_t *out) {
  napi_valuetype t = napi_undefined;
  if (i < argc && napi_typeof(env, argv[i], &t) != napi_ok) t = napi_undefined;
  if (t != napi_number) {
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, name, expected);
    return false;
  }
  double d = 0;
  /* the range test first (NaN fails it too), so the int64 conversion is defined */
  if (napi_get_value_double(env, argv[i], &d) != napi_ok || !(d >= min && d <= max) ||
      (double)(int64_t)d != d) {
    throw_type(env, "ERR_OUT_OF_RANGE", fn, name, expected);
    return false;
  }
  *out = (int64_t)d;
  return true;
}

static bool get_fd(napi_env env, napi_value *argv, size_t argc, const char *fn, int *fd) {
  int64_t v;
  if (!get_integer(env, argv, argc, 0, fn, "fd", 0, 2147483647.0,
                   "a file descriptor (integer >= 0)", &v))
    return false;
  *fd = (int)v;
  return true;
}

static bool get_offset(napi_env env, napi_value *argv, size_t argc, size_t i, const char *fn,
                       const char *name, off_t *out) {
  int64_t v;
  if (!get_integer(env, argv, argc, i, fn, name, 0, MAX_SAFE_INTEGER,
                   "an integer between 0 and 2^53 - 1", &v))
    return false;
  *out = (off_t)v;
  return true;
}

/* type argument: 'read' | 'write' (| 'unlock' when allow_unlock). */
static bool get_lock_type(napi_env env, napi_value *argv, size_t argc, size_t i, const char *fn,
                          bool allow_unlock, short *out) {
  const char *expected = allow_unlock ? "'read', 'write' or 'unlock'" : "'read' or 'write'";
  napi_valuetype t = napi_undefined;
  if (i < argc && napi_typeof(env, argv[i], &t) != napi_ok) t = napi_undefined;
  char buf[16] = {0};
  size_t len = 0;
  if (t != napi_string ||
      napi_get_value_string_utf8(env, argv[i], buf, sizeof buf, &len) != napi_ok) {
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, "type", expected);
    return false;
  }
  if (strcmp(buf, "read") == 0) *out = F_RDLCK;
  else if (strcmp(buf, "write") == 0) *out = F_WRLCK;
  else if (allow_unlock && strcmp(buf, "unlock") == 0) *out = F_UNLCK;
  else {
    throw_type(env, "ERR_INVALID_ARG_VALUE", fn, "type", expected);
    return false;
  }
  return true;
}

static napi_value make_number(napi_env env, double d) {
  napi_value v;
  CHECK_NAPI(env, napi_create_double(env, d, &v));
  return v;
}

/* ---- seekData / seekHole ---------------------------------------------------------- */

static napi_value do_seek(napi_env env, napi_callback_info info, const char *fn, int whence,
                          const char *syscall) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd;
  off_t off;
  if (!get_fd(env, argv, argc, fn, &fd) || !get_offset(env, argv, argc, 1, fn, "offset", &off))
    return NULL;
  off_t r = lseek(fd, off, whence);
  if (r < 0) {
    /* ENXIO: no data at or after offset (seekData), or offset at/past EOF. */
    if (errno == ENXIO) return make_number(env, -1);
    throw_errno(env, errno, syscall);
    return NULL;
  }
  return make_number(env, (double)r);
}

static napi_value SeekData(napi_env env, napi_callback_info info) {
#ifdef SEEK_DATA
  return do_seek(env, info, "seekData", SEEK_DATA, "lseek(SEEK_DATA)");
#else
  (void)info;
  throw_errno(env, ENOSYS, "lseek(SEEK_DATA)");
  return NULL;
#endif
}

static napi_value SeekHole(napi_env env, napi_callback_info info) {
#ifdef SEEK_HOLE
  return do_seek(env, info, "seekHole", SEEK_HOLE, "lseek(SEEK_HOLE)");
#else
  (void)info;
  throw_errno(env, ENOSYS, "lseek(SEEK_HOLE)");
  return NULL;
#endif
}

/* ---- OFD locks ---------------------------------------------------------------------- */

static bool get_lock_args(napi_env env, napi_callback_info info, const char *fn,
                          bool allow_unlock, int *fd, struct flock *fl) {
  size_t argc = 4;
  napi_value argv[4];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi_failure(env, "napi_get_cb_info");
    return false;
  }
  off_t start, len;
  short type;
  if (!get_fd(env, argv, argc, fn, fd) || !get_offset(env, argv, argc, 1, fn, "start", &start) ||
      !get_offset(env, argv, argc, 2, fn, "len", &len) ||
      !get_lock_type(env, argv, argc, 3, fn, allow_unlock, &type))
    return false;
  memset(fl, 0, sizeof *fl); /* F_OFD_* require l_pid == 0 */
  fl->l_type = type;
  fl->l_whence = SEEK_SET;
  fl->l_start = start;
  fl->l_len = len; /* 0 = to the end of the file, whatever its size */
  return true;
}

static napi_value OfdSetLock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!get_lock_args(env, info, "ofdSetLock", true, &fd, &fl)) return NULL;
#ifdef F_OFD_SETLK
  if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
    int e = errno;
    if (e == EAGAIN || e == EACCES) {
      napi_value v;
      CHECK_NAPI(env, napi_get_boolean(env, false, &v));
      return v;
    }
    throw_errno(env, e, "fcntl(F_OFD_SETLK)");
    return NULL;
  }
  napi_value v;
  CHECK_NAPI(env, napi_get_boolean(env, true, &v));
  return v;
#else
  throw_errno(env, ENOSYS, "fcntl(F_OFD_SETLK)");
  return NULL;
#endif
}

static napi_value OfdGetLock(napi_env env, napi_callback_info info) {
  int fd;
  struct flock fl;
  if (!get_lock_args(env, info, "ofdGetLock", false, &fd, &fl)) return NULL;
#ifdef F_OFD_GETLK
  if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
    throw_errno(env, errno, "fcntl(F_OFD_GETLK)");
    return NULL;
  }
  napi_value result, v;
  if (fl.l_type == F_UNLCK) {
    CHECK_NAPI(env, napi_get_null(env, &result));
    return result;
  }
  CHECK_NAPI(env, napi_create_object(env, &result));
  CHECK_NAPI(env, napi_create_string_utf8(env, fl.l_type == F_WRLCK ? "write" : "read",
                                          NAPI_AUTO_LENGTH, &v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "type", v));
  CHECK_NAPI(env, napi_create_double(env, (double)fl.l_start, &v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "start", v));
  CHECK_NAPI(env, napi_create_double(env, (double)fl.l_len, &v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "len", v));
  /* -1 for OFD locks (they belong to no process); the owner's pid for classic POSIX locks. */
  CHECK_NAPI(env, napi_create_int32(env, (int32_t)fl.l_pid, &v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "pid", v));
  return result;
#else
  throw_errno(env, ENOSYS, "fcntl(F_OFD_GETLK)");
  return NULL;
#endif
}

/* ---- fallocate ---------------------------------------------------------------------- */

static napi_value do_fallocate(napi_env env, napi_callback_info info, const char *fn, int mode,
                               const char *syscall) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd;
  off_t off, len;
  if (!get_fd(env, argv, argc, fn, &fd) || !get_offset(env, argv, argc, 1, fn, "offset", &off) ||
      !get_offset(env, argv, argc, 2, fn, "len", &len))
    return NULL;
  napi_value undef;
  CHECK_NAPI(env, napi_get_undefined(env, &undef));
  if (len == 0) return undef; /* fallocate rejects len 0 with EINVAL; nothing to do */
#ifdef __linux__
  int r;
  do r = fallocate(fd, mode, off, len);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    throw_errno(env, errno, syscall);
    return NULL;
  }
  return undef;
#else
  (void)fd; (void)off; (void)mode;
  throw_errno(env, EOPNOTSUPP, syscall);
  return NULL;
#endif
}

static napi_value PunchHole(napi_env env, napi_callback_info info) {
#ifdef __linux__
  return do_fallocate(env, info, "punchHole", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      "fallocate(PUNCH_HOLE)");
#else
  return do_fallocate(env, info, "punchHole", 0, "fallocate(PUNCH_HOLE)");
#endif
}

static napi_value ZeroRange(napi_env env, napi_callback_info info) {
#ifdef __linux__
  return do_fallocate(env, info, "zeroRange", FALLOC_FL_ZERO_RANGE, "fallocate(ZERO_RANGE)");
#else
  return do_fallocate(env, info, "zeroRange", 0, "fallocate(ZERO_RANGE)");
#endif
}

/* ---- writeback ---------------------------------------------------------------------- */

/*
 * Starts writing the range's dirty pages to the device without waiting for them (len 0: to
 * the end of the file). A later fdatasync then has less left to wait for. Durability still
 * comes only from fdatasync: this orders nothing.
 */
static napi_value StartWriteback(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd;
  off_t off, len;
  if (!get_fd(env, argv, argc, "startWriteback", &fd) ||
      !get_offset(env, argv, argc, 1, "startWriteback", "offset", &off) ||
      !get_offset(env, argv, argc, 2, "startWriteback", "len", &len))
    return NULL;
  napi_value undef;
  CHECK_NAPI(env, napi_get_undefined(env, &undef));
#ifdef __linux__
  int r;
  do r = sync_file_range(fd, off, len, SYNC_FILE_RANGE_WRITE);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    throw_errno(env, errno, "sync_file_range");
    return NULL;
  }
  return undef;
#else
  (void)fd; (void)off; (void)len;
  return undef; /* a hint only: nothing to do where the call does not exist */
#endif
}

/* ---- thread-pool requests ---------------------------------------------------------- */

/*
 * What a thread-pool request (readScan) needs: an async work item run on libuv's pool, the
 * JS callback to call when it is done, and the JS buffers it works on, kept alive until then.
 * A request struct starts with this, so the pointer to one is a pointer to the other.
 */
typedef struct {
  napi_async_work work;
  napi_ref callback;
  napi_ref keep[2];
} pool_request;

static void request_release(napi_env env, pool_request *r) {
  if (r->callback) napi_delete_reference(env, r->callback);
  for (size_t i = 0; i < 2; i++)
    if (r->keep[i]) napi_delete_reference(env, r->keep[i]);
  if (r->work) napi_delete_async_work(env, r->work);
}

/* Queues r (keep1 may be NULL); on failure throws, releases what was made and returns false. */
static bool request_queue(napi_env env, pool_request *r, const char *name, napi_async_execute_callback execute,
                          napi_async_complete_callback complete, napi_value callback, napi_value keep0, napi_value keep1) {
  napi_value js_name;
  if (napi_create_reference(env, callback, 1, &r->callback) != napi_ok ||
      napi_create_reference(env, keep0, 1, &r->keep[0]) != napi_ok ||
      (keep1 && napi_create_reference(env, keep1, 1, &r->keep[1]) != napi_ok) ||
      napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &js_name) != napi_ok ||
      napi_create_async_work(env, NULL, js_name, execute, complete, r, &r->work) != napi_ok ||
      napi_queue_async_work(env, r->work) != napi_ok) {
    throw_napi_failure(env, name);
    request_release(env, r);
    return false;
  }
  return true;
}

/* Calls the request's callback with err (NULL: with null), then releases the request. */
static void request_finish(napi_env env, pool_request *r, napi_value err) {
  napi_value cb, global;
  if (!err) napi_get_null(env, &err);
  if (napi_get_reference_value(env, r->callback, &cb) == napi_ok && napi_get_global(env, &global) == napi_ok)
    napi_call_function(env, global, cb, 1, &err, NULL);
  request_release(env, r);
}

/* ---- readScan ----------------------------------------------------------------------- */

/*
 * readScan(buf, segments, unit, bitmap, callback): on a libuv pool thread, fills buf from
 * `segments` (a Float64Array of quadruples [fd, bufOffset, fileOffset, length]; fd -1 means
 * "zeros"; bytes past a file's end read as zero), then, when unit > 0, sets bitmap[i] to 1 if
 * buf[i*unit, (i+1)*unit) holds any non-zero byte and to 0 otherwise, while those bytes are
 * still in the CPU's cache. callback(null) or callback(err) runs on the JS thread afterwards;
 * err is shaped like the synchronous functions' errors plus err.segment, the index of the
 * quadruple whose read failed. buf and bitmap must not be touched until then.
 *
 * readScan(buf, segments, unit, bitmap, callback, outFd, outOffset, step) also writes, on the
 * same thread, each run of units holding data to outFd at outOffset + its place in buf, in
 * pwrites of at most `step` bytes (see writeQueued): a copy to a raw file in one request. A
 * failed write gives err.syscall 'pwrite' and err.segment -1. outFd -1 means no writing.
 */
typedef struct {
  int fd;
  size_t at;
  off_t offset;
  size_t length;
} scan_segment;

typedef struct {
  pool_request req; /* first: keeps buf and bitmap */
  uint8_t *buf;
  size_t buf_len;
  uint8_t *bitmap;
  size_t unit;
  scan_segment *segs;
  size_t nsegs;
  int out_fd;      /* >= 0: write the units holding data there (see readScan's comment) */
  off_t out_offset;
  size_t out_step;
  int err;         /* errno of the failed read or write, 0 when all went well */
  long failed;     /* the read's segment, -1 for a write */
} scan_job;

/* true when p[0, n) is all zero bytes: 16 checked one by one (data is rarely zero there), then
 * memcmp of the range against itself shifted by 16, which equals only when every byte equals
 * the one 16 before it -- all zero, given the first 16. One pass, at memcmp's SIMD speed. */
static bool all_zero(const uint8_t *p, size_t n) {
  size_t head = n < 16 ? n : 16;
  for (size_t i = 0; i < head; i++)
    if (p[i]) return false;
  return n <= 16 || memcmp(p, p + 16, n - 16) == 0;
}

/* Writes len bytes at off in pwrite calls of at most `step` bytes; 0 or the errno. */
static int pwrite_all(int fd, const uint8_t *buf, size_t len, off_t off, size_t step) {
  size_t done = 0;
  while (done < len) {
    size_t n = len - done < step ? len - done : step;
    ssize_t w = pwrite(fd, buf + done, n, off + (off_t)done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO; /* cannot happen for regular files; do not spin */
    done += (size_t)w;
  }
  return 0;
}

/* Reads len bytes at off into buf (bytes past the end of the file read as zero); 0 or the errno. */
static int pread_full(int fd, uint8_t *buf, size_t len, off_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, len - done, off + (off_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) { /* end of file */
      memset(buf + done, 0, len - done);
      break;
    }
    done += (size_t)n;
  }
  return 0;
}

/*
 * Puts the calling thread (a pool thread running a readScan, the writer thread) in Linux's
 * SCHED_BATCH class, once: its wakeups no longer preempt the thread that woke it. Without it,
 * on a 2-vCPU VM, queueing a window read woke a pool thread that took the JS thread's CPU
 * straight away, and the JS thread lost 80-100 ms of a 2 GiB convert waiting to get it back
 * (170 us per readScan call, against 40 with this). The thread's share of the CPU is
 * unchanged; it only stops jumping the queue. A no-op where there is no SCHED_BATCH.
 */
static void batch_thread(void) {
#if defined(__linux__) && defined(SCHED_BATCH)
  static __thread bool done;
  if (done) return;
  done = true;
  struct sched_param sp = {0};
  sched_setscheduler(0, SCHED_BATCH, &sp); /* a hint: failure changes nothing else */
#endif
}

static void scan_execute(napi_env env, void *data) {
  batch_thread();
  scan_job *j = data;
  for (size_t s = 0; s < j->nsegs; s++) {
    const scan_segment *g = &j->segs[s];
    uint8_t *dst = j->buf + g->at;
    if (g->fd < 0) {
      memset(dst, 0, g->length);
      continue;
    }
    int e = pread_full(g->fd, dst, g->length, g->offset);
    if (e) {
      j->err = e;
      j->failed = (long)s;
      return;
    }
  }
  if (j->unit == 0) return;
  size_t units = 0;
  for (size_t u = 0; u < j->buf_len; u += j->unit, units++) {
    size_t n = j->buf_len - u < j->unit ? j->buf_len - u : j->unit;
    j->bitmap[units] = all_zero(j->buf + u, n) ? 0 : 1;
  }
  if (j->out_fd < 0) return;
  for (size_t i = 0; i < units;) {
    if (!j->bitmap[i]) { i++; continue; }
    size_t k = i + 1;
    while (k < units && j->bitmap[k]) k++;
    size_t start = i * j->unit, end = k * j->unit < j->buf_len ? k * j->unit : j->buf_len;
    int e = pwrite_all(j->out_fd, j->buf + start, end - start, j->out_offset + (off_t)start, j->out_step);
    if (e) {
      j->err = e;
      j->failed = -1;
      return;
    }
    i = k;
  }
}

static void scan_complete(napi_env env, napi_status status, void *data) {
  scan_job *j = data;
  napi_value err = NULL, v;
  if (status == napi_cancelled) {
    j->err = ECANCELED;
    j->failed = 0;
  }
  if (j->err) {
    err = failure_value(env, j->err, j->failed < 0 ? "pwrite" : "pread");
    napi_valuetype t;
    if (err && napi_typeof(env, err, &t) == napi_ok && t == napi_object &&
        napi_create_double(env, (double)j->failed, &v) == napi_ok)
      napi_set_named_property(env, err, "segment", v);
  }
  request_finish(env, &j->req, err);
  free(j->segs);
  free(j);
}

/* A Uint8Array argument's bytes (any view: Buffer, subarray). */
static bool get_bytes(napi_env env, napi_value v, const char *fn, const char *name,
                      uint8_t **data, size_t *len) {
  bool is = false;
  napi_typedarray_type type;
  void *p = NULL;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, len, &p, NULL, NULL) != napi_ok ||
      type != napi_uint8_array) {
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, name, "a Uint8Array");
    return false;
  }
  *data = p;
  return true;
}

static bool get_callback(napi_env env, napi_value v, const char *fn) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_function) {
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, "callback", "a function");
    return false;
  }
  return true;
}

/* Where a write of len bytes goes: argv[i] its offset, argv[i + 1] the pwrite step. */
static bool get_write_at(napi_env env, napi_value *argv, size_t argc, size_t i, const char *fn,
                         const char *name, size_t len, off_t *offset, int64_t *step) {
  if (!get_offset(env, argv, argc, i, fn, name, offset) ||
      !get_integer(env, argv, argc, i + 1, fn, "step", 1, 1073741824.0, "an integer between 1 and 2^30", step))
    return false;
  if ((double)*offset + (double)len > MAX_SAFE_INTEGER) {
    char expected[96];
    snprintf(expected, sizeof expected, "such that %s + buf.length <= 2^53 - 1", name);
    throw_type(env, "ERR_OUT_OF_RANGE", fn, name, expected);
    return false;
  }
  return true;
}

static napi_value ReadScan(napi_env env, napi_callback_info info) {
  const char *fn = "readScan";
  size_t argc = 8;
  napi_value argv[8];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 5) {
    throw_type(env, "ERR_MISSING_ARGS", fn, "callback", "given (5 arguments)");
    return NULL;
  }
  uint8_t *buf, *bitmap = NULL;
  size_t buf_len, bitmap_len = 0;
  if (!get_bytes(env, argv[0], fn, "buf", &buf, &buf_len)) return NULL;

  bool is = false;
  napi_typedarray_type type;
  size_t nvals = 0;
  void *vals = NULL;
  if (napi_is_typedarray(env, argv[1], &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, argv[1], &type, &nvals, &vals, NULL, NULL) != napi_ok ||
      type != napi_float64_array || nvals % 4 != 0) {
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, "segments", "a Float64Array of [fd, bufOffset, fileOffset, length] quadruples");
    return NULL;
  }
  int64_t unit;
  if (!get_integer(env, argv, argc, 2, fn, "unit", 0, 2147483647.0, "an integer >= 0", &unit)) return NULL;
  if (unit > 0) {
    if (!get_bytes(env, argv[3], fn, "bitmap", &bitmap, &bitmap_len)) return NULL;
    if (bitmap_len < (buf_len + (size_t)unit - 1) / (size_t)unit) {
      throw_type(env, "ERR_OUT_OF_RANGE", fn, "bitmap", "at least one byte per unit of buf");
      return NULL;
    }
  }
  if (!get_callback(env, argv[4], fn)) return NULL;

  /* optional: outFd, outOffset, step */
  int64_t out_fd = -1, out_step = 0;
  off_t out_offset = 0;
  if (argc >= 6) {
    if (!get_integer(env, argv, argc, 5, fn, "outFd", -1, 2147483647.0, "a file descriptor or -1", &out_fd)) return NULL;
    if (out_fd >= 0) {
      if (unit == 0) {
        throw_type(env, "ERR_OUT_OF_RANGE", fn, "unit", "> 0 when writing out");
        return NULL;
      }
      if (!get_write_at(env, argv, argc, 6, fn, "outOffset", buf_len, &out_offset, &out_step)) return NULL;
    }
  }

  size_t nsegs = nvals / 4;
  scan_job *j = calloc(1, sizeof *j);
  scan_segment *segs = nsegs ? calloc(nsegs, sizeof *segs) : NULL;
  if (!j || (nsegs && !segs)) {
    free(j);
    free(segs);
    throw_errno(env, ENOMEM, "readScan");
    return NULL;
  }
  j->segs = segs;
  const double *q = vals;
  for (size_t s = 0; s < nsegs; s++, q += 4) {
    double fd = q[0], at = q[1], off = q[2], len = q[3];
    /* each test also fails for NaN; integers only, inside buf, offsets within 2^53 */
    if (!(fd >= -1 && fd <= 2147483647.0 && fd == (double)(int64_t)fd) ||
        !(at >= 0 && at <= (double)buf_len && at == (double)(int64_t)at) ||
        !(len >= 0 && len <= (double)buf_len - at && len == (double)(int64_t)len) ||
        !(off >= 0 && off <= MAX_SAFE_INTEGER - len && off == (double)(int64_t)off)) {
      free(j);
      free(segs);
      throw_type(env, "ERR_OUT_OF_RANGE", fn, "segments", "[fd >= -1, bufOffset, fileOffset, length] integers inside buf");
      return NULL;
    }
    segs[s] = (scan_segment){(int)fd, (size_t)at, (off_t)off, (size_t)len};
  }
  j->nsegs = nsegs;
  j->buf = buf;
  j->buf_len = buf_len;
  j->bitmap = bitmap;
  j->unit = (size_t)unit;
  j->out_fd = (int)out_fd;
  j->out_offset = out_offset;
  j->out_step = (size_t)out_step;

  if (!request_queue(env, &j->req, "strata.readScan", scan_execute, scan_complete, argv[4], argv[0], bitmap ? argv[3] : NULL)) {
    free(j->segs);
    free(j);
    return NULL;
  }
  napi_value undef;
  CHECK_NAPI(env, napi_get_undefined(env, &undef));
  return undef;
}

/* ---- writeQueued -------------------------------------------------------------------- */

/*
 * writeQueued(fd, buf, offset, step, callback): writes all of buf at `offset` with pwrite
 * calls of at most `step` bytes each, on this addon's own writer thread, then callback(null |
 * err) on the JS thread (err as throw_errno's). buf must not be touched until then. Writes run
 * one after another in the order they were queued (all files share the queue).
 *
 * Why a thread of its own: a copy job's writes are its critical path, and it keeps several
 * window reads in libuv's pool at once. Queued there, each write first waited for the reads
 * ahead of it, and the next write could only be queued once the JS thread had seen the last
 * one finish. Here the next write starts as soon as the last one ends: a 2 GiB convert to
 * qcow2 on a 2-vCPU VM went from 0.46 to 0.34 s.
 *
 * Why steps: the page cache sizes the folios of a buffered write by the length and alignment
 * of each call, and a large aligned write gets large folios (512 KiB and up), which the
 * allocator takes from large free blocks. Under a hypervisor with free page reporting those
 * blocks are the ones given back to the host, and touching them costs a host fault per page:
 * measured on a 2-vCPU VM, 1 GiB in aligned 512 KiB-2 MiB writes took 1.3-3.4 s, in 256 KiB
 * writes 0.2-0.3 s, or 0.45-1.3 s when nearly all free memory had gone back (QEMU's 2 MiB
 * writes are mostly unaligned, which keeps their folios smaller too). Steps of 256 KiB keep
 * the folios small at the cost of a few thousand more syscalls per GiB.
 *
 * One writer per JS environment (the main thread, each worker), started on first use and
 * stopped when the environment is torn down. While writes are pending it keeps the event loop
 * alive, as a pool request does; when none are, it does not.
 */
typedef struct queued_write {
  struct queued_write *next;
  int fd;
  const uint8_t *buf;
  size_t len;
  off_t offset;
  size_t step;
  int err;
  napi_ref callback;
  napi_ref keep;
} queued_write;

typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  queued_write *head, *tail; /* waiting for the writer thread */
  bool started;              /* the thread and `done` exist */
  bool stopping;
  pthread_t thread;
  napi_threadsafe_function done; /* hands finished writes back to the JS thread */
  size_t pending;                /* queued and not yet called back (JS thread only) */
} write_queue;

static void *writer_main(void *arg) {
  write_queue *q = arg;
  batch_thread();
  for (;;) {
    pthread_mutex_lock(&q->mu);
    while (!q->head && !q->stopping) pthread_cond_wait(&q->cv, &q->mu);
    if (q->stopping) {
      pthread_mutex_unlock(&q->mu);
      return NULL;
    }
    queued_write *w = q->head;
    q->head = w->next;
    if (!q->head) q->tail = NULL;
    pthread_mutex_unlock(&q->mu);
    w->err = pwrite_all(w->fd, w->buf, w->len, w->offset, w->step);
    /* The queue is unbounded, so this never blocks; it fails only while the environment is
       being torn down, when no callback can run any more. */
    if (napi_call_threadsafe_function(q->done, w, napi_tsfn_nonblocking) != napi_ok) free(w);
  }
}

/* On the JS thread: the callback of one finished write. */
static void write_done_js(napi_env env, napi_value js_cb, void *context, void *data) {
  write_queue *q = context;
  queued_write *w = data;
  if (env) { /* NULL while the environment is torn down: only free */
    napi_value cb, global, err = NULL;
    if (w->err) err = failure_value(env, w->err, "pwrite");
    if (!err) napi_get_null(env, &err);
    if (napi_get_reference_value(env, w->callback, &cb) == napi_ok && napi_get_global(env, &global) == napi_ok)
      napi_call_function(env, global, cb, 1, &err, NULL);
    napi_delete_reference(env, w->callback);
    napi_delete_reference(env, w->keep);
    if (--q->pending == 0) napi_unref_threadsafe_function(env, q->done);
  }
  free(w);
}

/*
 * Environment teardown, first hook: stops the writer thread (after the write it is doing, if
 * any) and drops the writes not done. Added after `done` was made, so it runs before N-API's
 * own teardown of `done` (hooks run in reverse order).
 */
static void write_queue_stop(void *arg) {
  write_queue *q = arg;
  pthread_mutex_lock(&q->mu);
  q->stopping = true;
  pthread_cond_signal(&q->cv);
  pthread_mutex_unlock(&q->mu);
  pthread_join(q->thread, NULL);
  for (queued_write *w = q->head, *next; w; w = next) {
    next = w->next;
    free(w);
  }
  q->head = q->tail = NULL;
  napi_release_threadsafe_function(q->done, napi_tsfn_abort);
}

/* Environment teardown, last hook: frees the queue. */
static void write_queue_free(void *arg) {
  write_queue *q = arg;
  pthread_cond_destroy(&q->cv);
  pthread_mutex_destroy(&q->mu);
  free(q);
}

/* The function N-API 4 wants a threadsafe function to have; write_done_js calls the callbacks. */
static napi_value write_queue_noop(napi_env env, napi_callback_info info) {
  return NULL;
}

static bool write_queue_start(napi_env env, write_queue *q) {
  napi_value name, noop;
  if (napi_create_string_utf8(env, "strata.writeQueued", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_function(env, "writeQueuedDone", NAPI_AUTO_LENGTH, write_queue_noop, NULL, &noop) != napi_ok ||
      napi_create_threadsafe_function(env, noop, NULL, name, 0, 1, NULL, NULL, q, write_done_js, &q->done) != napi_ok)
    return false;
  napi_unref_threadsafe_function(env, q->done); /* ref'd only while writes are pending */
  if (pthread_create(&q->thread, NULL, writer_main, q) != 0) {
    napi_release_threadsafe_function(q->done, napi_tsfn_abort);
    return false;
  }
  if (napi_add_env_cleanup_hook(env, write_queue_stop, q) != napi_ok) {
    write_queue_stop(q);
    q->stopping = false; /* a later call may start it again */
    return false;
  }
  q->started = true;
  return true;
}

static napi_value WriteQueued(napi_env env, napi_callback_info info) {
  const char *fn = "writeQueued";
  size_t argc = 5;
  napi_value argv[5];
  write_queue *q;
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, (void **)&q));
  int fd;
  off_t offset;
  int64_t step;
  uint8_t *buf;
  size_t len;
  if (!get_fd(env, argv, argc, fn, &fd)) return NULL;
  if (argc < 5) {
    throw_type(env, "ERR_MISSING_ARGS", fn, "callback", "given (5 arguments)");
    return NULL;
  }
  if (!get_bytes(env, argv[1], fn, "buf", &buf, &len) ||
      !get_write_at(env, argv, argc, 2, fn, "offset", len, &offset, &step) ||
      !get_callback(env, argv[4], fn))
    return NULL;
  if (!q->started && !write_queue_start(env, q)) {
    throw_napi_failure(env, "starting the writer thread");
    return NULL;
  }
  queued_write *w = calloc(1, sizeof *w);
  if (!w) {
    throw_errno(env, ENOMEM, fn);
    return NULL;
  }
  *w = (queued_write){.fd = fd, .buf = buf, .len = len, .offset = offset, .step = (size_t)step};
  if (napi_create_reference(env, argv[4], 1, &w->callback) != napi_ok ||
      napi_create_reference(env, argv[1], 1, &w->keep) != napi_ok) {
    if (w->callback) napi_delete_reference(env, w->callback);
    free(w);
    throw_napi_failure(env, fn);
    return NULL;
  }
  if (q->pending++ == 0) napi_ref_threadsafe_function(env, q->done);
  pthread_mutex_lock(&q->mu);
  if (q->tail) q->tail->next = w;
  else q->head = w;
  q->tail = w;
  pthread_cond_signal(&q->cv);
  pthread_mutex_unlock(&q->mu);
  napi_value undef;
  CHECK_NAPI(env, napi_get_undefined(env, &undef));
  return undef;
}

/* ---- memory ------------------------------------------------------------------------- */

/*
 * The size of a transparent huge page (the PMD size), or 0 where there are none: read once
 * from sysfs. Linux only; "never" in .../transparent_hugepage/enabled also gives 0.
 */
static size_t huge_page_size(void) {
  static size_t cached = (size_t)-1; /* computed once; a race only computes it twice */
  if (cached != (size_t)-1) return cached;
  size_t size = 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  char mode[128] = {0};
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (f) {
    if (!fgets(mode, sizeof mode, f)) mode[0] = 0;
    fclose(f);
  }
  unsigned long long n = 0;
  if (mode[0] && !strstr(mode, "[never]")) {
    f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r");
    if (f) {
      if (fscanf(f, "%llu", &n) != 1) n = 0;
      fclose(f);
    }
  }
  /* A power of two above the base page, or nothing. */
  long page = sysconf(_SC_PAGESIZE);
  if (page > 0 && n > (unsigned long long)page && (n & (n - 1)) == 0) size = (size_t)n;
#endif
  cached = size;
  return size;
}

/*
 * adviseHugePages(buf): asks for transparent huge pages (MADV_HUGEPAGE) on the part of buf
 * that starts and ends on a huge-page boundary, and returns where that part starts (its
 * offset in buf), or -1 when there is no such part or the system has no huge pages for it.
 * Pages not yet touched are then faulted in 2 MiB at a time: a 32 MiB copy buffer costs 16
 * page faults instead of 8192. Only a hint: the contents and the buffer's use are unchanged.
 */
static napi_value AdviseHugePages(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint8_t *data;
  size_t len;
  if (!get_bytes(env, argc > 0 ? argv[0] : NULL, "adviseHugePages", "buf", &data, &len)) return NULL;
  double result = -1;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  size_t huge = huge_page_size();
  if (huge && len >= huge) {
    uintptr_t start = ((uintptr_t)data + huge - 1) & ~(uintptr_t)(huge - 1);
    uintptr_t end = ((uintptr_t)data + len) & ~(uintptr_t)(huge - 1);
    if (end > start && madvise((void *)start, end - start, MADV_HUGEPAGE) == 0) result = (double)(start - (uintptr_t)data);
  }
#endif
  return make_number(env, result);
}

/* ---- l2RunEnd --------------------------------------------------------------------- */

/*
 * l2RunEnd(table, index, end, clusterSize): standard (8-byte, big-endian) L2 entries of `table`
 * from `index` on; returns the first index in (index, end) whose entry is not its predecessor's
 * host offset plus one cluster with the same top byte (flags and reserved bits), or `end`.
 * Such a run decodes like its first entry, cluster after cluster. A metadata-preallocated
 * 1 TiB image has 16 million entries: in JavaScript this loop took ~100 ns an entry.
 */
static napi_value L2RunEnd(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint8_t *data;
  size_t len;
  int64_t index, end, cs;
  const double entries_max = 1 << 20, cs_max = 1 << 21;
  if (!get_bytes(env, argc > 0 ? argv[0] : NULL, "l2RunEnd", "table", &data, &len) ||
      !get_integer(env, argv, argc, 1, "l2RunEnd", "index", 0, entries_max, "an entry index", &index) ||
      !get_integer(env, argv, argc, 2, "l2RunEnd", "end", 1, entries_max, "an entry index", &end) ||
      !get_integer(env, argv, argc, 3, "l2RunEnd", "clusterSize", 512, cs_max, "a cluster size", &cs))
    return NULL;
  if (end <= index || (uint64_t)end > len / 8) {
    throw_type(env, "ERR_OUT_OF_RANGE", "l2RunEnd", "end", "an index past `index`, within the table");
    return NULL;
  }
  const uint64_t mask = 0x00ffffffffffffffULL;
  const uint8_t *p = data + (size_t)index * 8;
  uint8_t top = p[0];
  uint64_t prev = 0;
  for (int i = 0; i < 8; i++) prev = (prev << 8) | p[i];
  int64_t k = index + 1;
  for (p += 8; k < end; k++, p += 8) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    if (p[0] != top || (v & mask) != (prev & mask) + (uint64_t)cs) break;
    prev = v;
  }
  return make_number(env, (double)k);
}

/* ---- extended attributes ------------------------------------------------------------ */

/* A string argument, copied into a malloc'd NUL-terminated buffer (free it). */
static char *get_string(napi_env env, napi_value *argv, size_t argc, size_t i, const char *fn,
                        const char *name) {
  napi_valuetype t = napi_undefined;
  if (i < argc && napi_typeof(env, argv[i], &t) != napi_ok) t = napi_undefined;
  size_t len = 0;
  if (t != napi_string || napi_get_value_string_utf8(env, argv[i], NULL, 0, &len) != napi_ok) {
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, name, "a string");
    return NULL;
  }
  char *s = malloc(len + 1);
  if (!s) {
    throw_errno(env, ENOMEM, fn);
    return NULL;
  }
  if (napi_get_value_string_utf8(env, argv[i], s, len + 1, &len) != napi_ok) {
    free(s);
    throw_type(env, "ERR_INVALID_ARG_TYPE", fn, name, "a string");
    return NULL;
  }
  return s;
}

/* Names of the file's extended attributes (those this process may see), as an array. */
static napi_value ListXattrs(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd;
  if (!get_fd(env, argv, argc, "listXattrs", &fd)) return NULL;
  napi_value arr;
  CHECK_NAPI(env, napi_create_array(env, &arr));
#ifdef __linux__
  char *buf = NULL;
  ssize_t n;
  for (;;) { /* the list may grow between the size query and the read: ERANGE, ask again */
    n = flistxattr(fd, NULL, 0);
    if (n <= 0) break;
    char *b = realloc(buf, (size_t)n);
    if (!b) { free(buf); throw_errno(env, ENOMEM, "flistxattr"); return NULL; }
    buf = b;
    n = flistxattr(fd, buf, (size_t)n);
    if (n >= 0 || errno != ERANGE) break;
  }
  if (n < 0) {
    int e = errno;
    free(buf);
    if (e == ENOTSUP) return arr; /* the file system has none */
    throw_errno(env, e, "flistxattr");
    return NULL;
  }
  uint32_t k = 0;
  for (ssize_t i = 0; i < n;) {
    size_t len = strlen(buf + i);
    napi_value name;
    if (napi_create_string_utf8(env, buf + i, len, &name) != napi_ok ||
        napi_set_element(env, arr, k++, name) != napi_ok) {
      free(buf);
      throw_napi_failure(env, "listXattrs");
      return NULL;
    }
    i += (ssize_t)len + 1;
  }
  free(buf);
#else
  (void)fd;
#endif
  return arr;
}

/* The value of one extended attribute, as a Buffer. */
static napi_value GetXattr(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd;
  if (!get_fd(env, argv, argc, "getXattr", &fd)) return NULL;
  char *name = get_string(env, argv, argc, 1, "getXattr", "name");
  if (!name) return NULL;
#ifdef __linux__
  char *buf = NULL;
  ssize_t n;
  for (;;) {
    n = fgetxattr(fd, name, NULL, 0);
    if (n < 0) break;
    char *b = realloc(buf, n ? (size_t)n : 1);
    if (!b) { free(buf); free(name); throw_errno(env, ENOMEM, "fgetxattr"); return NULL; }
    buf = b;
    if (n == 0) break;
    n = fgetxattr(fd, name, buf, (size_t)n);
    if (n >= 0 || errno != ERANGE) break;
  }
  free(name);
  if (n < 0) {
    int e = errno;
    free(buf);
    throw_errno(env, e, "fgetxattr");
    return NULL;
  }
  napi_value out;
  void *copy;
  napi_status st = napi_create_buffer_copy(env, (size_t)n, buf, &copy, &out);
  free(buf);
  CHECK_NAPI(env, st);
  return out;
#else
  free(name);
  (void)fd;
  throw_errno(env, ENOTSUP, "fgetxattr");
  return NULL;
#endif
}

/* Sets (creates or replaces) one extended attribute. */
static napi_value SetXattr(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK_NAPI(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd;
  if (!get_fd(env, argv, argc, "setXattr", &fd)) return NULL;
  uint8_t *data;
  size_t len;
  if (argc < 3 || !get_bytes(env, argv[2], "setXattr", "value", &data, &len)) {
    if (argc < 3) throw_type(env, "ERR_INVALID_ARG_TYPE", "setXattr", "value", "a Uint8Array");
    return NULL;
  }
  char *name = get_string(env, argv, argc, 1, "setXattr", "name");
  if (!name) return NULL;
#ifdef __linux__
  int r = fsetxattr(fd, name, data, len, 0);
  int e = errno;
  free(name);
  if (r < 0) {
    throw_errno(env, e, "fsetxattr");
    return NULL;
  }
  napi_value undef;
  CHECK_NAPI(env, napi_get_undefined(env, &undef));
  return undef;
#else
  free(name);
  (void)fd; (void)data; (void)len;
  throw_errno(env, ENOTSUP, "fsetxattr");
  return NULL;
#endif
}

/* ---- module ------------------------------------------------------------------------- */

static napi_value Init(napi_env env, napi_value exports) {
  static const struct { const char *name; napi_callback cb; } fns[] = {
    {"seekData", SeekData},     {"seekHole", SeekHole},   {"ofdSetLock", OfdSetLock},
    {"ofdGetLock", OfdGetLock}, {"punchHole", PunchHole}, {"zeroRange", ZeroRange},
    {"startWriteback", StartWriteback}, {"readScan", ReadScan},
    {"adviseHugePages", AdviseHugePages}, {"l2RunEnd", L2RunEnd},
    {"listXattrs", ListXattrs},   {"getXattr", GetXattr},   {"setXattr", SetXattr},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value fn; /* named, so stack traces say seekData rather than <anonymous> */
    CHECK_NAPI(env, napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].cb, NULL, &fn));
    CHECK_NAPI(env, napi_set_named_property(env, exports, fns[i].name, fn));
  }
  /* writeQueued's queue belongs to this environment: the function carries it as its data */
  write_queue *q = calloc(1, sizeof *q);
  if (!q) {
    throw_errno(env, ENOMEM, "strata_native init");
    return NULL;
  }
  pthread_mutex_init(&q->mu, NULL);
  pthread_cond_init(&q->cv, NULL);
  if (napi_add_env_cleanup_hook(env, write_queue_free, q) != napi_ok) {
    write_queue_free(q);
    throw_napi_failure(env, "strata_native init");
    return NULL;
  }
  napi_value fn;
  CHECK_NAPI(env, napi_create_function(env, "writeQueued", NAPI_AUTO_LENGTH, WriteQueued, q, &fn));
  CHECK_NAPI(env, napi_set_named_property(env, exports, "writeQueued", fn));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
