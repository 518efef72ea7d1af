#!/usr/bin/env python3
"""A pass-through FUSE file system that fails a chosen write.

    faultfs.py ROOT MOUNTPOINT

Everything under MOUNTPOINT is ROOT's. The control file MOUNTPOINT/.faultfs takes one line:
    arm N once|sticky EIO|ENOSPC   fail the Nth write from now (once, or it and every write,
                                   fsync and truncate after it), counting anew
    count                          fail nothing, count anew
and reading it gives "writes=W fsyncs=F failed=K" since then. Writes are counted as FUSE sees
them (up to 128 KiB each with big_writes). Used by test/support/faultfs.ts; needs python3-fusepy.
"""
import errno
import os
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations

CONTROL = '/.faultfs'


class FaultFS(Operations):
    use_ns = True

    def __init__(self, root):
        self.root = os.path.realpath(root)
        self.mu = threading.Lock()
        self.reset(0, 'once', 'EIO')

    def reset(self, n, mode, code):
        self.arm_at = n
        self.sticky = mode == 'sticky'
        self.code = getattr(errno, code)
        self.writes = 0
        self.fsyncs = 0
        self.failed = 0
        self.dead = False

    def real(self, path):
        return os.path.join(self.root, path.lstrip('/'))

    def status(self):
        return f'writes={self.writes} fsyncs={self.fsyncs} failed={self.failed}\n'.encode()

    # -- the fault: returns the errno to fail with, or 0
    def fault_for_write(self):
        with self.mu:
            self.writes += 1
            if self.dead or (self.arm_at and self.writes == self.arm_at):
                self.failed += 1
                if self.sticky:
                    self.dead = True
                return self.code
            return 0

    def dead_errno(self):
        with self.mu:
            if self.dead:
                self.failed += 1
                return self.code
            return 0

    # -- control file
    def getattr(self, path, fh=None):
        if path == CONTROL:
            return {'st_mode': 0o100644, 'st_nlink': 1, 'st_size': len(self.status()), 'st_uid': 0, 'st_gid': 0}
        st = os.lstat(self.real(path))
        return {k: getattr(st, k) for k in ('st_atime', 'st_ctime', 'st_gid', 'st_mode', 'st_mtime', 'st_nlink', 'st_size', 'st_uid', 'st_blocks', 'st_ino')}

    def open(self, path, flags):
        if path == CONTROL:
            return 0
        return os.open(self.real(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self.real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        if path == CONTROL:
            return self.status()[offset:offset + size]
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if path == CONTROL:
            words = data.decode().split()
            with self.mu:
                if words and words[0] == 'arm':
                    self.reset(int(words[1]), words[2], words[3])
                else:
                    self.reset(0, 'once', 'EIO')
            return len(data)
        e = self.fault_for_write()
        if e:
            raise FuseOSError(e)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if path == CONTROL:
            return
        e = self.dead_errno()
        if e:
            raise FuseOSError(e)
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self.real(path), length)

    def fsync(self, path, datasync, fh):
        if path == CONTROL:
            return 0
        with self.mu:
            self.fsyncs += 1
        e = self.dead_errno()
        if e:
            raise FuseOSError(e)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        if path != CONTROL:
            os.close(fh)
        return 0

    def readdir(self, path, fh):
        return ['.', '..'] + os.listdir(self.real(path))

    def unlink(self, path):
        os.unlink(self.real(path))

    def rename(self, old, new):
        os.rename(self.real(old), self.real(new))

    def mkdir(self, path, mode):
        os.mkdir(self.real(path), mode)

    def rmdir(self, path):
        os.rmdir(self.real(path))

    def chmod(self, path, mode):
        os.chmod(self.real(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self.real(path), uid, gid)

    def utimens(self, path, times=None):
        if times:
            os.utime(self.real(path), ns=times)
        else:
            os.utime(self.real(path))

    def access(self, path, mode):
        if path != CONTROL and not os.access(self.real(path), mode):
            raise FuseOSError(errno.EACCES)

    def statfs(self, path):
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ('f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail', 'f_ffree', 'f_files', 'f_flag', 'f_frsize', 'f_namemax')}


if __name__ == '__main__':
    root, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(FaultFS(root), mountpoint, foreground=True, nothreads=False, big_writes=True, max_write=131072, default_permissions=True, allow_other=False, use_ino=True)
