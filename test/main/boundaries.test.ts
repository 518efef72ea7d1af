// The layering rules that keep the app safe and testable, checked on the sources: only
// main/electron/ imports electron; the renderer imports no node: module (nor anything that
// does); the desktop window is isolated, sandboxed, without Node, under a strict CSP.
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { repoRoot } from '../cli/run-cli';
import { CSP, trustedSender, windowOptions } from '../../main/electron/window-options';
import { contentSecurityPolicy } from '../../main/server/http-server';

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...sources(p));
    else if (/\.(ts|tsx|mts|cts)$/.test(e.name)) out.push(p);
  }
  return out;
}

const IMPORT = /(?:^|\n)\s*(?:import|export)\s[^'"]*?from\s+['"]([^'"]+)['"]|import\(\s*['"]([^'"]+)['"]\s*\)|require\(\s*['"]([^'"]+)['"]\s*\)/g;

function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  return [...text.matchAll(IMPORT)].map((m) => m[1] ?? m[2] ?? m[3]!).filter(Boolean);
}

describe('boundaries', () => {
  it('only main/electron/ imports electron', () => {
    const offenders: string[] = [];
    for (const dir of ['core', 'cli', 'main', 'renderer', 'bench', 'scripts']) {
      for (const f of sources(join(repoRoot, dir))) {
        const rel = relative(repoRoot, f);
        if (rel.startsWith('main/electron/')) continue;
        if (importsOf(f).some((m) => m === 'electron' || m.startsWith('electron/'))) offenders.push(rel);
      }
    }
    expect(offenders).toEqual([]);
  });

  it('the renderer imports no node: module, directly or through what it imports', () => {
    const seen = new Set<string>();
    const offenders: string[] = [];
    const visit = (file: string) => {
      if (seen.has(file)) return;
      seen.add(file);
      for (const m of importsOf(file)) {
        if (m.startsWith('node:') || ['fs', 'path', 'os', 'child_process', 'crypto', 'util', 'net', 'http'].includes(m)) offenders.push(`${relative(repoRoot, file)} imports ${m}`);
        if (!m.startsWith('.')) continue;
        const base = join(file, '..', m);
        for (const cand of [base, `${base}.ts`, `${base}.tsx`, join(base, 'index.ts')]) {
          try { if (readFileSync(cand)) { visit(cand); break; } } catch { /* not this one */ }
        }
      }
    };
    // vite.config.ts configures the build; it is not part of the page.
    for (const f of sources(join(repoRoot, 'renderer')).filter((f) => !f.endsWith('vite.config.ts'))) visit(f);
    expect(seen.size).toBeGreaterThan(10);
    expect(offenders).toEqual([]);
  });

  it('the desktop window is isolated, sandboxed, without Node, and devtools are off by default', () => {
    const o = windowOptions('/app/preload.cjs');
    expect(o.webPreferences).toMatchObject({
      preload: '/app/preload.cjs', contextIsolation: true, sandbox: true, nodeIntegration: false, nodeIntegrationInWorker: false,
      nodeIntegrationInSubFrames: false, webSecurity: true, allowRunningInsecureContent: false, webviewTag: false, devTools: false,
    });
  });

  it('the CSPs allow only the app\'s own scripts and styles, no inline code, no framing', () => {
    for (const csp of [CSP, contentSecurityPolicy(4321)]) {
      const d = Object.fromEntries(csp.split(';').map((x) => x.trim().split(/\s+/)).map(([k, ...v]) => [k, v]));
      expect(d['default-src']).toEqual(["'none'"]);
      expect(d['script-src']).toEqual(["'self'"]);
      expect(d['style-src']).toEqual(["'self'"]);
      expect(d['object-src']).toEqual(["'none'"]);
      expect(d['frame-ancestors']).toEqual(["'none'"]);
      expect(csp).not.toContain('unsafe-inline');
      expect(csp).not.toContain('unsafe-eval');
    }
    expect(CSP).toContain("connect-src 'none'");
    expect(contentSecurityPolicy(4321)).toContain("connect-src 'self' ws://127.0.0.1:4321 ws://localhost:4321");
  });

  it('IPC is answered only for the app\'s own top frame', () => {
    expect(trustedSender('strata://app/', true)).toBe(true);
    expect(trustedSender('strata://app/index.html', true)).toBe(true);
    expect(trustedSender('strata://app/', false)).toBe(false);
    expect(trustedSender('https://evil.example/', true)).toBe(false);
    expect(trustedSender('strata://apps/', true)).toBe(false);
    expect(trustedSender(undefined, true)).toBe(false);
  });
});
