// `npm run iotests`: QEMU's own iotests for the installed qemu-img, run once with qemu-img and
// once with strata in its place, and the difference explained.
//
// The tests come from the Debian source package of the installed qemu-img (`apt-get source`,
// which needs a deb-src entry), unpacked into a cache folder outside the repository
// ($XDG_CACHE_HOME/strata-iotests, or ~/.cache/strata-iotests) and reused from there. Only qcow2
// tests that need no virtual machine run: those whose script starts no qemu-system, no QMP
// machine and no storage daemon. qemu-io and qemu-nbd are always the real ones; qemu-img is the
// real one, then a link named qemu-img to bin/strata.cjs (invoked under that name, strata prints
// qemu-img's messages). Each difference gets its reason from test/iotests/known.json; the exit
// status is 1 when a difference has none.
//
//   npm run iotests [-- [-j N] [--side both|qemu|strata] [TEST ...]]
//
// --side strata reuses the qemu-img results of the last run with the same tests (they only change
// with the package). TEST names tests (001, 122, copy-offloading), default all that qualify.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync, chmodSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { homedir, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { needsNoVm, parseTapLines, report } from './iotests-lib.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const knownFile = join(root, 'test', 'iotests', 'known.json');

function die(msg) {
  process.stderr.write(`iotests: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const o = { jobs: 1, side: 'both', tests: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-j') o.jobs = Number(argv[++i]);
    else if (a.startsWith('-j')) o.jobs = Number(a.slice(2));
    else if (a === '--side') o.side = argv[++i];
    else if (a === '-h' || a === '--help') { process.stdout.write(readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n') + '\n'); process.exit(0); }
    else if (a.startsWith('-')) die(`unknown option ${a}`);
    else o.tests.push(a);
  }
  if (!Number.isInteger(o.jobs) || o.jobs < 1) die('-j takes a number of parallel tests');
  if (!['both', 'qemu', 'strata'].includes(o.side)) die('--side is both, qemu or strata');
  return o;
}

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** The Debian source version of the installed qemu-img ("1:7.2+dfsg-7+deb12u18"). */
function sourceVersion() {
  const r = spawnSync('dpkg-query', ['-W', '-f=${source:Version}', 'qemu-utils'], { encoding: 'utf8' });
  if (r.status !== 0 || !r.stdout.trim()) die('qemu-utils is not installed as a Debian package (apt-get install qemu-utils): the tests are taken from its source package');
  return r.stdout.trim();
}

/** The iotests folder of the source package, fetched and unpacked once. */
function fetchIotests(cache, version) {
  const dir = join(cache, `qemu-${version.replace(/^\d+:/, '')}`);
  const iotests = join(dir, 'tests', 'qemu-iotests');
  if (existsSync(join(iotests, 'check'))) return iotests;
  const dl = join(cache, 'download');
  rmSync(dl, { recursive: true, force: true });
  mkdirSync(dl, { recursive: true });
  process.stderr.write(`iotests: fetching the source package qemu=${version} into ${cache}\n`);
  const get = spawnSync('apt-get', ['source', '--download-only', `qemu=${version}`], { cwd: dl, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
  if (get.status !== 0) {
    die(`apt-get source qemu=${version} failed:\n${get.stderr}\nIt needs a deb-src entry: add a file such as /etc/apt/sources.list.d/debian-src.sources with
  Types: deb-src
  URIs: http://deb.debian.org/debian
  Suites: bookworm bookworm-updates
  Components: main
  Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
(and the same for the security suite), then apt-get update.`);
  }
  const dsc = readdirSync(dl).find((f) => f.endsWith('.dsc'));
  if (!dsc) die(`apt-get source left no .dsc in ${dl}`);
  const tmp = `${dir}.partial`;
  rmSync(tmp, { recursive: true, force: true });
  const x = spawnSync('dpkg-source', ['-x', join(dl, dsc), tmp], { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
  if (x.status !== 0) die(`dpkg-source -x ${dsc} failed:\n${x.stderr}`);
  renameSync(tmp, dir);
  rmSync(dl, { recursive: true, force: true });
  // dpkg-source leaves a copy of the upstream tarball beside the folder it unpacked.
  for (const f of readdirSync(cache)) if (/\.orig\.tar\./.test(f)) rmSync(join(cache, f), { force: true });
  return iotests;
}

/** Every test (numbered, and named under tests/) that needs no VM, by the name ./check takes. */
function selectTests(iotests) {
  const out = [];
  const add = (dir, name) => {
    const text = readFileSync(join(dir, name), 'utf8');
    if (needsNoVm(text) && (existsSync(join(dir, `${name}.out`)) || existsSync(join(dir, `${name}.out.qcow2`)))) out.push(name);
  };
  for (const f of readdirSync(iotests).sort()) if (/^\d{3}$/.test(f)) add(iotests, f);
  const named = join(iotests, 'tests');
  for (const f of readdirSync(named).sort()) if (!f.includes('.')) add(named, f);
  return out;
}

/**
 * Stand-ins and the strata link, made once per run in the cache: the link in a folder of this
 * checkout's own, so that runs from two checkouts sharing the cache each test their own build.
 */
function tools(cache) {
  const bin = join(cache, 'bin', createHash('sha256').update(root).digest('hex').slice(0, 8));
  // Made in place (not removed first): another run may be using them.
  mkdirSync(bin, { recursive: true });
  // ./check asks qemu-system for its default machine even when no test starts one.
  const stub = join(bin, 'qemu-system-stub');
  writeFileSync(stub, '#!/bin/sh\nif [ "$1" = -machine ] && [ "$2" = help ]; then echo "none empty machine (default)"; exit 0; fi\necho "qemu-system is not available to these tests" >&2\nexit 1\n');
  chmodSync(stub, 0o755);
  const link = join(bin, 'qemu-img');
  const tmp = `${link}.${process.pid}`;
  symlinkSync(join(root, 'bin', 'strata.cjs'), tmp);
  renameSync(tmp, link);
  return { stub, strataImg: link };
}

/** Runs ./check for one qemu-img; resolves to a Map test -> 'pass' | 'fail' | 'not run'. */
function runCheck(iotests, tests, { label, qemuImg, stub, scratch, jobs }) {
  rmSync(scratch, { recursive: true, force: true });
  mkdirSync(join(scratch, 'sock'), { recursive: true });
  const env = {
    ...process.env,
    QEMU_PROG: stub, QSD_PROG: stub, QEMU_IMG_PROG: qemuImg,
    QEMU_IO_PROG: which('qemu-io'), QEMU_NBD_PROG: which('qemu-nbd'),
    TEST_DIR: join(scratch, 'test'), SOCK_DIR: join(scratch, 'sock'),
  };
  const args = ['-qcow2', '-tap', ...(jobs > 1 ? ['-j', String(jobs)] : []), ...tests];
  process.stderr.write(`iotests: ${label}: ${tests.length} tests (${qemuImg})\n`);
  return new Promise((resolve, reject) => {
    const p = spawn(join(iotests, 'check'), args, { cwd: iotests, env, stdio: ['ignore', 'pipe', 'pipe'] });
    const results = new Map();
    let buf = '';
    let log = '';
    p.stdout.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        log += line + '\n';
        for (const r of parseTapLines(line)) {
          results.set(r.test, r.status);
          process.stderr.write(`  ${label} ${r.test.padEnd(24)} ${r.status}\n`);
        }
      }
    });
    p.stderr.on('data', (d) => { log += d; });
    p.on('error', reject);
    p.on('close', () => {
      writeFileSync(join(scratch, 'check.log'), log);
      resolve(results);
    });
  });
}

function loadKnown() {
  if (!existsSync(knownFile)) return {};
  return JSON.parse(readFileSync(knownFile, 'utf8'));
}

const opts = parseArgs(process.argv.slice(2));
for (const p of ['qemu-img', 'qemu-io', 'qemu-nbd', 'python3']) if (!which(p)) die(`${p} is not installed`);
if (!existsSync(join(root, 'dist', 'strata.cjs'))) die('strata is not built: npm install (or npm run build) first');
const cache = join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'strata-iotests');
mkdirSync(cache, { recursive: true });
const version = sourceVersion();
const iotests = fetchIotests(cache, version);
const all = selectTests(iotests);
const tests = opts.tests.length ? opts.tests : all;
for (const t of tests) if (!all.includes(t)) die(`${t}: no such test, or it needs a VM`);
const { stub, strataImg } = tools(cache);
// The tests' scratch folders: some tests (197, 215) refuse a TEST_DIR with anything but
// letters, digits, '-', '_' and '/' (a dot in ~/.cache is enough).
// One run at a time per cache: a run empties its scratch folders first.
const scratchRoot = join(tmpdir(), `strata-iotests-${createHash('sha256').update(`${cache}\0${root}`).digest('hex').slice(0, 8)}`);
if (/[^-_a-zA-Z0-9/]/.test(scratchRoot)) die(`the temporary folder ${scratchRoot} has characters some tests refuse: set TMPDIR to a plain path`);
mkdirSync(scratchRoot, { recursive: true });
const lockFile = join(scratchRoot, 'run.pid');
try {
  const other = Number(readFileSync(lockFile, 'utf8'));
  if (other && other !== process.pid) {
    let alive = true;
    try { process.kill(other, 0); } catch { alive = false; }
    if (alive) die(`another run (pid ${other}) is using ${scratchRoot}; wait for it to end`);
  }
} catch { /* no other run */ }
writeFileSync(lockFile, String(process.pid));
process.on('exit', () => { try { rmSync(lockFile); } catch { /* gone */ } });

const savedQemu = join(cache, 'qemu-img-results.json');
let qemu;
if (opts.side === 'strata') {
  const saved = existsSync(savedQemu) ? JSON.parse(readFileSync(savedQemu, 'utf8')) : null;
  if (!saved || saved.version !== version || tests.some((t) => !(t in saved.results))) die('--side strata needs an earlier run with qemu-img over these tests (--side qemu)');
  qemu = new Map(Object.entries(saved.results));
} else {
  qemu = await runCheck(iotests, tests, { label: 'qemu-img', qemuImg: which('qemu-img'), stub, scratch: join(scratchRoot, 'qemu-img'), jobs: opts.jobs });
  const prev = existsSync(savedQemu) ? JSON.parse(readFileSync(savedQemu, 'utf8')) : null;
  const merged = prev?.version === version ? prev.results : {};
  for (const [t, s] of qemu) merged[t] = s;
  writeFileSync(savedQemu, JSON.stringify({ version, results: merged }, null, 1));
}
if (opts.side === 'qemu') {
  const pass = tests.filter((t) => qemu.get(t) === 'pass').length;
  process.stdout.write(`qemu-img ${version}: ${pass} of ${tests.length} tests pass\n`);
  process.exit(0);
}
const strataScratch = join(scratchRoot, 'strata');
const strata = await runCheck(iotests, tests, { label: 'strata', qemuImg: strataImg, stub, scratch: strataScratch, jobs: opts.jobs });

const { text, unexplained } = report({
  tests, qemu, strata, known: loadKnown(),
  header: `QEMU iotests, qcow2, tests that need no VM: ${tests.length} (qemu ${version}, ${iotests})`,
  // ./check -j N runs each test in a folder of its own.
  badFile: (t) => [join(strataScratch, 'test', t, `${t}.out.bad`), join(strataScratch, 'test', `${t}.out.bad`)].find(existsSync) ?? `${t}.out.bad`,
});
process.stdout.write(text);
process.exit(unexplained ? 1 : 0);
