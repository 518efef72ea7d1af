// bin/strata.cjs is both a sh script (what npm links as `strata`) and the CommonJS script node
// runs: through sh it drops NODE_EXTRA_CA_CERTS before starting node (the CLI makes no TLS
// connections and node parses that file at every start); through `node bin/strata.cjs` the
// same program runs unchanged. It compiles dist/strata.cjs with the V8 code cache the build
// made (dist/strata.cjs.cache), which V8 takes only with the launcher's own flags.
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, repoRoot } from './run-cli';
import { tempDir } from '../oracle/qemu';

const bin = join(repoRoot, 'bin', 'strata.cjs');
// A file that does not exist: node warns about it on stderr at startup when it reads the variable.
const env = { ...process.env, NODE_EXTRA_CA_CERTS: '/nonexistent/strata-test-ca.pem', STRATA_DEBUG: undefined };

/** Runs fn with a temporary folder holding bin/strata, a link to the launcher as npm makes it. */
function withLink(fn: (link: string, t: ReturnType<typeof tempDir>) => void): void {
  const t = tempDir('strata-launcher-');
  try {
    mkdirSync(t.path('bin'));
    const link = t.path('bin/strata');
    symlinkSync(bin, link);
    fn(link, t);
  } finally {
    t.cleanup();
  }
}

describe('bin/strata.cjs', () => {
  beforeAll(() => ensureBuilt());

  it('through sh (the npm link), runs the CLI without NODE_EXTRA_CA_CERTS', () => {
    withLink((link, t) => {
      const r = spawnSync(link, ['--version'], { encoding: 'utf8', env });
      expect(r.status).toBe(0);
      expect(r.stdout).toMatch(/^strata \d+\.\d+\.\d+\n/);
      expect(r.stderr).toBe('');
      // Arguments pass through unchanged (spaces included), and so do exit codes.
      const missing = t.path('no such image.qcow2');
      const e = spawnSync(link, ['info', missing], { encoding: 'utf8', env });
      expect(e.status).toBe(1);
      expect(e.stderr).toBe(`strata: ${missing}: cannot open: no such file\n`);
    });
  });

  it('uses the code cache the build made when started as a command; without the flags, or with a damaged cache, V8 compiles as usual', () => {
    withLink((link, t) => {
      const report = { ...env, STRATA_CODE_CACHE: 'report' };
      const asCommand = spawnSync(link, ['--version'], { encoding: 'utf8', env: report });
      expect(asCommand.stderr).toBe('strata: code cache used\n');
      expect(asCommand.stdout).toMatch(/^strata \d+\.\d+\.\d+\n/);
      const throughNode = spawnSync(process.execPath, [bin, '--version'], { encoding: 'utf8', env: { ...report, NODE_EXTRA_CA_CERTS: undefined } });
      expect(throughNode.stderr).toBe('strata: code cache rejected\n');
      expect(throughNode.stdout).toMatch(/^strata \d+\.\d+\.\d+\n/);
      // A copy of the launcher and bundle with a damaged cache beside them.
      mkdirSync(t.path('copy/bin'), { recursive: true });
      mkdirSync(t.path('copy/dist'));
      copyFileSync(bin, t.path('copy/bin/strata.cjs'));
      copyFileSync(join(repoRoot, 'dist', 'strata.cjs'), t.path('copy/dist/strata.cjs'));
      writeFileSync(t.path('copy/dist/strata.cjs.cache'), Buffer.alloc(4096, 0x5a));
      const damaged = spawnSync(t.path('copy/bin/strata.cjs'), ['info', '--output=json', t.path('missing.qcow2')], { encoding: 'utf8', env: report });
      expect(damaged.stderr).toBe(`strata: code cache rejected\nstrata: ${t.path('missing.qcow2')}: cannot open: no such file\n`);
      expect(damaged.status).toBe(1);
    });
  });

  it('starts only the node modules a command uses: a plain convert loads no compression, crypto, network, workers, streams or fs/promises; -c does', () => {
    const t = tempDir('strata-startup-');
    try {
      const raw = t.path('in.raw');
      const data = Buffer.alloc(1 << 20);
      data.write('compressible text '.repeat(20000));
      writeFileSync(raw, data);
      // Prints node's list of loaded built-in modules at exit, on fd 3.
      const preload = t.path('modules.cjs');
      writeFileSync(preload, "process.on('exit', () => require('node:fs').writeSync(3, JSON.stringify(process.moduleLoadList)));\n");
      const loaded = (args: string[]): string[] => {
        const r = spawnSync(process.execPath, ['--require', preload, bin, ...args], { encoding: 'utf8', env: { ...env, NODE_EXTRA_CA_CERTS: undefined }, stdio: ['ignore', 'pipe', 'pipe', 'pipe'] });
        expect(r.stderr).toBe('');
        expect(r.status).toBe(0);
        return JSON.parse(r.output[3] as string) as string[];
      };
      const heavy = ['NativeModule zlib', 'NativeModule worker_threads', 'NativeModule stream', 'NativeModule net', 'NativeModule fs/promises', 'NativeModule crypto'];
      const plain = loaded(['convert', '-O', 'qcow2', raw, t.path('plain.qcow2')]);
      expect(plain).toContain('NativeModule fs'); // the list is the real one
      for (const m of heavy) expect(plain, m).not.toContain(m);
      const compressed = loaded(['convert', '-c', '-O', 'qcow2', raw, t.path('c.qcow2')]);
      expect(compressed).toContain('NativeModule zlib');
    } finally {
      t.cleanup();
    }
  });

  it('through node, is the same program (node itself reads the variable first)', () => {
    const r = spawnSync(process.execPath, [bin, '--version'], { encoding: 'utf8', env });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^strata \d+\.\d+\.\d+\n/);
    expect(r.stderr).toContain('strata-test-ca.pem');
  });
});
