// The packaging configuration stays valid (electron-builder's own schema) and packs what the
// app needs: the main bundle package.json names, Linux AppImage and deb (mac and win
// declared), and the native code unpacked from the asar archive.
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot } from '../cli/run-cli';

const require = createRequire(import.meta.url);

describe('packaging', () => {
  it('electron-builder.yml passes electron-builder\'s schema and packs the native code unpacked', async () => {
    const { getConfig, validateConfiguration } = require('app-builder-lib/out/util/config/config.js');
    const { DebugLogger } = require('builder-util/out/DebugLogger.js');
    const cfg = await getConfig(repoRoot, join(repoRoot, 'electron-builder.yml'), null);
    await expect(validateConfiguration(cfg, new DebugLogger(false))).resolves.toBeUndefined();
    expect(cfg.linux.target).toEqual(['AppImage', 'deb']);
    expect(cfg.mac.target).toEqual(['dmg']);
    expect(cfg.win.target).toEqual(['nsis']);
    expect(cfg.asarUnpack).toEqual(expect.arrayContaining(['native/build/Release/*.node', 'node_modules/zstd-napi/**']));
    const files = (cfg.files as ({ filter: string[] } | string)[]).flatMap((f) => (typeof f === 'string' ? [f] : f.filter));
    expect(files).toEqual(expect.arrayContaining(['dist/**', 'native/build/Release/*.node', 'node_modules/zstd-napi/**']));
  });

  it('package.json names the built Electron main process, and npm run dist builds first', () => {
    const pkg = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8'));
    expect(pkg.main).toBe('dist/electron/main.cjs');
    expect(existsSync(join(repoRoot, pkg.main))).toBe(true);
    expect(existsSync(join(repoRoot, 'dist/electron/preload.cjs'))).toBe(true);
    expect(existsSync(join(repoRoot, 'dist/electron/job-process.cjs'))).toBe(true);
    expect(pkg.scripts.dist).toMatch(/^node scripts\/build\.mjs && electron-builder /);
    // The bundles leave electron to Electron and import nothing else outside themselves but zstd's binding.
    const main = readFileSync(join(repoRoot, pkg.main), 'utf8');
    const required = [...main.matchAll(/require\("([^"]+)"\)/g)].map((m) => m[1]!).filter((m) => !m.startsWith('node:'));
    expect([...new Set(required)].sort()).toEqual(expect.arrayContaining(['electron']));
    for (const m of required) expect(['electron', 'zstd-napi', 'fs', 'path', 'os', 'crypto', 'events', 'http', 'https', 'net', 'tls', 'stream', 'url', 'zlib', 'buffer', 'util', 'child_process', 'worker_threads', 'module', 'assert', 'string_decoder', 'querystring', 'bufferutil', 'utf-8-validate']).toContain(m);
  });
});
