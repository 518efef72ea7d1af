// The esbuild settings of the CLI bundle: scripts/build.mjs builds dist/ with them, and the
// benchmark (bench/lib/engine.mjs) builds its own copy of the engine with exactly the same.
export function cliBundleOptions(entry, outdir) {
  return {
    entryPoints: { strata: entry },
    outdir,
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
  };
}
