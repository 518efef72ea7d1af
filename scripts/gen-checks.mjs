// Writes core/protocol/checks.generated.ts: the protocol's zod schemas described as data for the
// page's checks (see core/protocol/describe.ts). Run by `npm run build` before the renderer is
// built; a test fails when the committed file is out of date.
import { build } from 'esbuild';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const out = 'core/protocol/checks.generated.ts';
const dir = mkdtempSync(join(tmpdir(), 'strata-gen-checks-'));
try {
  const file = join(dir, 'describe.mjs');
  await build({ entryPoints: ['core/protocol/describe.ts'], bundle: true, platform: 'node', format: 'esm', outfile: file, logLevel: 'error', absWorkingDir: process.cwd() });
  const { generatedChecksSource } = await import(pathToFileURL(file).href);
  const text = generatedChecksSource();
  let old = '';
  try { old = readFileSync(out, 'utf8'); } catch { /* first time */ }
  if (old !== text) writeFileSync(out, text);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
