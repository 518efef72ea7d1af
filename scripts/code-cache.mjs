// The V8 code cache of the CLI bundle (dist/strata.cjs.cache): bin/strata.cjs hands it to V8
// with the bundle's source, and the functions it holds are not parsed and compiled again at
// every start (`strata info` 60 -> 45 ms, with the CommonJS bundle). It is made by running the
// launcher on a small sample (STRATA_CODE_CACHE=write), so that it holds the functions the
// commands really use, compiled as the launcher's V8 flags have them. V8 checks its version,
// flags and the source against the cache and ignores a cache that does not fit; a missing
// one only costs that compile time. Never fails the build.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Runs `launcher` (bin/strata.cjs beside the bundle) on a sample image, writing the cache. */
export function warmCodeCache(launcher, log = (m) => process.stderr.write(m + '\n')) {
  let dir;
  try {
    dir = mkdtempSync(join(tmpdir(), 'strata-code-cache-'));
    // 8 MiB: random-ish data, text, zeros and holes, so the copy paths all run.
    const raw = join(dir, 'sample.raw');
    const buf = Buffer.alloc(8 << 20);
    let s = 0x9e3779b9;
    for (let i = 0; i < 2 << 20; i++) { s ^= s << 13; s ^= s >>> 17; s ^= s << 5; buf[i] = s & 0xff; }
    buf.write('the image the backing the cluster '.repeat(30000), 3 << 20);
    writeFileSync(raw, buf);
    const q = join(dir, 'sample.qcow2');
    const steps = [
      ['convert', '-O', 'qcow2', raw, q],
      ['convert', '-O', 'raw', q, join(dir, 'out.raw')],
      ['convert', '-O', 'qcow2', q, join(dir, 'out.qcow2')],
      ['info', q],
      ['info', '--output=json', q],
      ['map', '--output=json', q],
      ['check', q],
      ['compare', q, raw],
    ];
    for (const args of steps) {
      // Through sh, as the installed command runs: the launcher's own node flags apply.
      const r = spawnSync(launcher, args, { env: { ...process.env, STRATA_CODE_CACHE: 'write' }, encoding: 'utf8', timeout: 60_000 });
      if (r.status !== 0) {
        log(`strata: code cache not complete (strata ${args[0]} failed: ${(r.stderr || r.error?.message || '').split('\n')[0]}); starts are a little slower`);
        return false;
      }
    }
    return true;
  } catch (err) {
    log(`strata: code cache not made (${err instanceof Error ? err.message : String(err)}); starts are a little slower`);
    return false;
  } finally {
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
}
