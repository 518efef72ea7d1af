// Runs one command and measures its wall time and peak resident set size (RSS).
//
// How RSS is measured (the first that works is used, and results.json records which):
//   1. 'gnu-time': the command runs under GNU time (`/usr/bin/time -f ... -o FILE`), whose %M
//      is ru_maxrss from wait4(): the kernel's own peak RSS of the child, exact and including
//      everything up to exit. GNU time 1.9 (Debian bookworm's `time` package) reports KiB;
//      1.7 had a bug that multiplied by 4, so the version is checked.
//   2. 'proc-poll': Linux without GNU time: /proc/<pid>/status VmHWM (the kernel's RSS
//      high-water mark) is sampled every few milliseconds while the child runs. VmHWM is
//      monotonic, so only growth in the last few ms before exit can be missed.
//   3. 'none': RSS is not measured (reported as null).
// Wall time is always taken here with process.hrtime around spawn..exit, so the methods
// agree on timing; GNU time adds well under a millisecond of its own.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const GNU_TIME = '/usr/bin/time';

function gnuTimeUsable() {
  if (!existsSync(GNU_TIME)) return false;
  const r = spawnSync(GNU_TIME, ['--version'], { encoding: 'utf8' });
  const text = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  if (!/GNU/.test(text)) return false;
  // GNU time 1.7 reports %M four times too large; refuse it.
  return !/GNU [Tt]ime\)? 1\.7\b/.test(text);
}

/** Installs Debian's `time` package when it is missing and we are root with apt; never fails. */
function tryInstallGnuTime(log) {
  if (existsSync(GNU_TIME) || process.platform !== 'linux' || process.getuid?.() !== 0) return;
  if (spawnSync('sh', ['-c', 'command -v apt-get'], { stdio: 'ignore' }).status !== 0) return;
  log('bench: GNU time is missing; installing the Debian package `time` (root, apt-get)');
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  let r = spawnSync('apt-get', ['install', '-y', '-q', 'time'], { stdio: 'ignore', env, timeout: 120_000 });
  if (r.status !== 0) {
    spawnSync('apt-get', ['update', '-q'], { stdio: 'ignore', env, timeout: 120_000 });
    r = spawnSync('apt-get', ['install', '-y', '-q', 'time'], { stdio: 'ignore', env, timeout: 120_000 });
  }
  if (r.status !== 0) log('bench: could not install `time`; falling back to polling /proc/<pid>/status');
}

/** Picks the RSS method once per run. */
export function chooseRssMethod(log = (m) => process.stderr.write(m + '\n')) {
  if (process.env.BENCH_RSS_METHOD) return process.env.BENCH_RSS_METHOD;
  tryInstallGnuTime(log);
  if (gnuTimeUsable()) return 'gnu-time';
  if (process.platform === 'linux' && existsSync('/proc/self/status')) return 'proc-poll';
  return 'none';
}

export const RSS_METHOD_DESCRIPTION = {
  'gnu-time': 'GNU time %M (ru_maxrss of the child from wait4, exact peak RSS)',
  'proc-poll': '/proc/<pid>/status VmHWM sampled every 5 ms (may miss growth in the last few ms)',
  none: 'not measured',
};

let seq = 0;

/**
 * Runs cmd argv; resolves { wallS, rssKiB, userS, sysS, code, signal, stderr }.
 * stdout is discarded; the last 4 KiB of stderr are kept for error messages.
 */
export function measure(method, cmd, argv, { env, cwd } = {}) {
  return new Promise((resolve, reject) => {
    const timeFile = join(tmpdir(), `strata-bench-time-${process.pid}-${++seq}.txt`);
    const [file, args] = method === 'gnu-time'
      ? [GNU_TIME, ['-f', '%M %U %S', '-o', timeFile, cmd, ...argv]]
      : [cmd, argv];
    let stderr = '';
    let hwmKiB = null;
    let poll = null;
    const t0 = process.hrtime.bigint();
    const child = spawn(file, args, { stdio: ['ignore', 'ignore', 'pipe'], env: env ?? process.env, cwd });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-4096); });
    if (method === 'proc-poll') {
      const sample = () => {
        try {
          const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
          if (m) hwmKiB = Math.max(hwmKiB ?? 0, Number(m[1]));
        } catch { /* exited */ }
      };
      sample();
      poll = setInterval(sample, 5);
    }
    child.on('error', (err) => { if (poll) clearInterval(poll); reject(err); });
    child.on('close', (code, signal) => {
      const wallS = Number(process.hrtime.bigint() - t0) / 1e9;
      if (poll) clearInterval(poll);
      let rssKiB = hwmKiB;
      let userS = null;
      let sysS = null;
      if (method === 'gnu-time') {
        try {
          // The last line holds the numbers; earlier lines are GNU time's own notes such as
          // "Command exited with non-zero status 1".
          const lines = readFileSync(timeFile, 'utf8').trim().split('\n');
          const [m, u, s] = lines[lines.length - 1].trim().split(/\s+/).map(Number);
          rssKiB = m; userS = u; sysS = s;
        } catch { /* leave null */ }
        rmSync(timeFile, { force: true });
      }
      resolve({ wallS, rssKiB, userS, sysS, code, signal, stderr });
    });
  });
}
