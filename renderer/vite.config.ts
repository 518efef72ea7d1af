// The renderer build: React + Tailwind, bundled into dist/renderer. The page loads nothing
// from elsewhere (the CSP of Electron and browser mode allows only its own files).
import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';
import tailwindcss from '@tailwindcss/vite';
import { fileURLToPath } from 'node:url';

export default defineConfig({
  root: fileURLToPath(new URL('.', import.meta.url)),
  base: './',
  plugins: [react(), tailwindcss()],
  build: {
    outDir: fileURLToPath(new URL('../dist/renderer', import.meta.url)),
    emptyOutDir: true,
    sourcemap: true,
    // One small app: no module preload polyfill (it would be an inline script the CSP forbids).
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 1500,
  },
  logLevel: 'warn',
});
