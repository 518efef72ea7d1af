// The lock doctor (core/io/lock-doctor.ts): parsing the kernel's lock lines (/proc/locks and
// /proc/PID/fdinfo/FD), the VM name from a QEMU command line, and the holder description the
// "image is in use" errors carry. Plus findLockHolders on a real lock taken by a child process.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { statSync, writeFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { describeHolders, findLockHolders, parseLockLines, vmNameFromArgs, type LockHolder } from '../../../core/io/lock-doctor';
import { tempDir } from '../../oracle/qemu';

const EOF = Number.MAX_SAFE_INTEGER;

// Captured on Linux 6.x while qemu-nbd (OFD locks) and a Python fcntl.lockf (POSIX locks) held
// files; plus the kinds the kernel prints for other lock types and a blocked waiter ("->").
const PROC_LOCKS = [
  '1: OFDLCK ADVISORY  READ -1 fe:00:2147508 203 203',
  '2: OFDLCK ADVISORY  READ -1 fe:00:2147508 201 201',
  '3: OFDLCK ADVISORY  READ -1 fe:00:2147508 103 103',
  '4: OFDLCK ADVISORY  READ -1 fe:00:2147508 100 101',
  '5: POSIX  ADVISORY  WRITE 28275 fe:00:2147509 500 EOF',
  '5: -> POSIX  ADVISORY  WRITE 28300 fe:00:2147509 500 EOF',
  '6: POSIX  ADVISORY  READ 28275 08:1f:12 100 100',
  '7: FLOCK  ADVISORY  WRITE 901 00:2c:77 0 EOF',
  '',
].join('\n');

const FDINFO = [
  'pos:\t196616',
  'flags:\t02100002',
  'mnt_id:\t27',
  'ino:\t2147508',
  'lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2147508 100 101',
  'lock:\t2: OFDLCK ADVISORY  READ -1 fe:00:2147508 103 103',
  'lock:\t3: OFDLCK ADVISORY  READ -1 fe:00:2147508 201 201',
  'lock:\t4: OFDLCK ADVISORY  READ -1 fe:00:2147508 203 203',
  '',
].join('\n');

describe('parseLockLines', () => {
  it('parses /proc/locks: OFD and POSIX lines, EOF ends, hex devices; blocked waiters are not holders', () => {
    expect(parseLockLines(PROC_LOCKS)).toEqual([
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 203, end: 203 },
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 201, end: 201 },
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 103, end: 103 },
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 100, end: 101 },
      { kind: 'POSIX', type: 'WRITE', pid: 28275, dev: 'fe:00', ino: 2147509, start: 500, end: EOF },
      { kind: 'POSIX', type: 'READ', pid: 28275, dev: '08:1f', ino: 12, start: 100, end: 100 },
      { kind: 'FLOCK', type: 'WRITE', pid: 901, dev: '00:2c', ino: 77, start: 0, end: EOF },
    ]);
  });

  it('parses the "lock:" lines of /proc/PID/fdinfo/FD and ignores the other fields', () => {
    expect(parseLockLines(FDINFO)).toEqual([
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 100, end: 101 },
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 103, end: 103 },
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 201, end: 201 },
      { kind: 'OFDLCK', type: 'READ', pid: -1, dev: 'fe:00', ino: 2147508, start: 203, end: 203 },
    ]);
  });

  it('returns nothing for text without lock lines or with malformed ones', () => {
    expect(parseLockLines('')).toEqual([]);
    expect(parseLockLines('pos:\t0\nflags:\t0100000\nmnt_id:\t25\nino:\t3\n')).toEqual([]);
    expect(parseLockLines('lock:\tgarbage\n1: OFDLCK\n')).toEqual([]);
  });

  it('keeps large inode numbers and offsets exact', () => {
    const [l] = parseLockLines('1: OFDLCK ADVISORY  READ -1 103:02:9007199254740 4294967396 4294967396\n');
    expect(l).toEqual({ kind: 'OFDLCK', type: 'READ', pid: -1, dev: '103:02', ino: 9007199254740, start: 4294967396, end: 4294967396 });
  });
});

describe('vmNameFromArgs', () => {
  it('takes guest=NAME from -name, as libvirt passes it', () => {
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'guest=win11,debug-threads=on'])).toBe('win11');
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'debug-threads=on,guest=win11'])).toBe('win11');
    expect(vmNameFromArgs(['/usr/bin/qemu-system-x86_64', '-machine', 'q35', '-name', 'guest=win11', '-m', '4G'])).toBe('win11');
  });

  it('takes a bare -name NAME', () => {
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'win11'])).toBe('win11');
  });

  it('is null without a guest name', () => {
    expect(vmNameFromArgs(['qemu-system-x86_64', '-m', '4G'])).toBeNull();
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name'])).toBeNull();
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'debug-threads=on'])).toBeNull();
    expect(vmNameFromArgs([])).toBeNull();
  });

  // QEMU's -name option list has implied_opt_name "guest" (softmmu/vl.c qemu_name_opts): a first
  // element without "=" is the guest name even when other options follow it.
  it('takes the implied guest name in "-name NAME,debug-threads=on" (QEMU implied_opt_name)', () => {
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'win11,debug-threads=on'])).toBe('win11');
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'win11,process=qemu-win11'])).toBe('win11');
  });

  // QEMU accepts every option with two dashes as well (--name).
  it('accepts --name like QEMU does', () => {
    expect(vmNameFromArgs(['qemu-system-x86_64', '--name', 'guest=win11'])).toBe('win11');
  });

  // In QEMU option strings ",," is an escaped comma inside a value.
  it('unescapes ",," in the name', () => {
    expect(vmNameFromArgs(['qemu-system-x86_64', '-name', 'guest=my,,vm,debug-threads=on'])).toBe('my,vm');
  });
});

describe('describeHolders', () => {
  const h = (pid: number, program: string, vmName: string | null = null): LockHolder => ({ pid, program, vmName, bytes: [100, 101, 103, 201, 203] });

  it('names one holder with its PID and program, and the VM when known', () => {
    expect(describeHolders([h(4242, 'qemu-io')])).toBe('PID 4242 (qemu-io) holds it');
    expect(describeHolders([h(77, 'qemu-system-x86_64', 'win11')])).toBe("PID 77 (qemu-system-x86_64, VM 'win11') holds it");
  });

  it('lists several holders, and still reads as a sentence when none could be found', () => {
    expect(describeHolders([h(1, 'qemu-nbd'), h(2, 'qemu-system-x86_64', 'db')])).toBe("PID 1 (qemu-nbd), PID 2 (qemu-system-x86_64, VM 'db') hold it");
    expect(describeHolders([])).toBe('another process (not found in /proc) holds it');
  });
});

describe('findLockHolders', () => {
  const tmp = tempDir('strata-lockdoc-');
  const children: ChildProcessWithoutNullStreams[] = [];
  afterAll(() => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    tmp.cleanup();
  });

  it('finds a child holding POSIX locks on the file, with its pid, program and bytes; [] for unlocked and missing files', async () => {
    const file = tmp.path('held.bin');
    writeFileSync(file, Buffer.alloc(4096));
    const other = tmp.path('free.bin');
    writeFileSync(other, Buffer.alloc(4096));
    expect(await findLockHolders(other)).toEqual([]);
    expect(await findLockHolders(tmp.path('missing.bin'))).toEqual([]);
    // python3's fcntl.lockf takes classic POSIX record locks, which fdinfo lists like OFD ones.
    const py = [
      'import fcntl, os, sys',
      `fd = os.open(${JSON.stringify(file)}, os.O_RDWR)`,
      'fcntl.lockf(fd, fcntl.LOCK_SH, 2, 100)',
      'fcntl.lockf(fd, fcntl.LOCK_SH, 1, 201)',
      'print("locked", flush=True)',
      'sys.stdin.read()',
    ].join('\n');
    const child = spawn('python3', ['-c', py, '-name', 'guest=pyvm'], { stdio: 'pipe' }) as ChildProcessWithoutNullStreams;
    children.push(child);
    await new Promise<void>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d: Buffer) => { out += d.toString(); if (out.includes('locked')) resolve(); });
      child.on('exit', (code) => reject(new Error(`python3 exited (${code}) before locking`)));
      child.on('error', reject);
    });
    const holders = await findLockHolders(file);
    expect(holders).toEqual([{ pid: child.pid, program: 'python3', vmName: 'pyvm', bytes: [100, 101, 201] }]);
    expect(describeHolders(holders)).toBe(`PID ${child.pid} (python3, VM 'pyvm') holds it`);
    // the process doing the search is left out
    expect(await findLockHolders(file, child.pid!)).toEqual([]);
    child.stdin.end();
    await new Promise((r) => child.once('exit', r));
    expect(await findLockHolders(file)).toEqual([]);
    expect(statSync(file).size).toBe(4096);
  });
});

describe('programName', () => {
  it('names Strata\'s own processes, and others by their program', async () => {
    const { programName } = await import('../../../core/io/lock-doctor');
    expect(programName(['/usr/bin/node', '--interrupt-budget=540000', '/opt/strata/bin/strata.cjs', '__job-process'])).toBe('Strata job');
    expect(programName(['node', '/usr/lib/strata/bin/strata.cjs', 'commit', 'x.qcow2'])).toBe('strata');
    expect(programName(['/usr/bin/qemu-system-x86_64', '-name', 'guest=vm1'])).toBe('qemu-system-x86_64');
    expect(programName(['node', 'server.js'])).toBe('node');
    expect(programName([])).toBe('');
  });
});
