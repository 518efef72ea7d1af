// bin/strata.mjs is both a sh script (what npm links as `strata`) and the ES module node runs:
// through sh it drops NODE_EXTRA_CA_CERTS before starting node (the CLI makes no TLS
// connections and node parses that file at every start); through `node bin/strata.mjs` the
// same program runs unchanged.
import { spawnSync } from 'node:child_process';
import { mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, repoRoot } from './run-cli';
import { tempDir } from '../oracle/qemu';

const bin = join(repoRoot, 'bin', 'strata.mjs');
// A file that does not exist: node warns about it on stderr at startup when it reads the variable.
const env = { ...process.env, NODE_EXTRA_CA_CERTS: '/nonexistent/strata-test-ca.pem', STRATA_DEBUG: undefined };

describe('bin/strata.mjs', () => {
  beforeAll(() => ensureBuilt());

  it('through sh (the npm link), runs the CLI without NODE_EXTRA_CA_CERTS', () => {
    const t = tempDir('strata-launcher-');
    try {
      mkdirSync(t.path('bin'));
      const link = t.path('bin/strata');
      symlinkSync(bin, link);
      const r = spawnSync(link, ['--version'], { encoding: 'utf8', env });
      expect(r.status).toBe(0);
      expect(r.stdout).toMatch(/^strata \d+\.\d+\.\d+\n/);
      expect(r.stderr).toBe('');
      // Arguments pass through unchanged (spaces included), and so do exit codes.
      const missing = t.path('no such image.qcow2');
      const e = spawnSync(link, ['info', missing], { encoding: 'utf8', env });
      expect(e.status).toBe(1);
      expect(e.stderr).toBe(`strata: ${missing}: cannot open: no such file\n`);
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
