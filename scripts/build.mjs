// Builds what bin/strata.mjs needs: the CLI bundled into dist/ so it starts fast under plain Node.
import { buildNative } from './build-native.mjs'; await buildNative(); // optional addon; never fails the build
import { build } from 'esbuild';

await build({
  entryPoints: { strata: 'cli/main.ts' },
  outdir: 'dist',
  outExtension: { '.js': '.mjs' },
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  sourcemap: true,
  external: ['zstd-napi'],
  // ESM has no require(); native modules are loaded through one made here.
  banner: { js: "import { createRequire as __strataCreateRequire } from 'node:module'; const require = __strataCreateRequire(import.meta.url);" },
  logLevel: 'warning',
});
