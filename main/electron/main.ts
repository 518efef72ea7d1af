// The Electron main process: app lifecycle, one window, IPC, native dialogs, notifications.
// Everything else is the plain-Node services (main/services) that browser mode uses too; this
// file only connects them to Electron.
import { app, BrowserWindow, dialog, ipcMain, MessageChannelMain, Notification, protocol, session, utilityProcess, type UtilityProcess } from 'electron';
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { extname, join, resolve, sep } from 'node:path';
import { AppServices } from '../services/app-services';
import { Connection, createDispatcher } from '../services/rpc';
import { parseFromJob, type JobExit, type JobHandle, type JobHost } from '../services/job-host';
import type { FromJob, ToJob } from '../../core/protocol/job-process';
import { APP_ORIGIN, CSP, trustedSender, windowOptions } from './window-options';

const TYPES: Record<string, string> = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.svg': 'image/svg+xml', '.png': 'image/png', '.woff2': 'font/woff2', '.map': 'application/json' };

let win: BrowserWindow | null = null;

/** Job processes as Electron utility processes; progress goes to the window over a MessagePort. */
class UtilityJobHost implements JobHost {
  constructor(private readonly entry: string) {}
  spawn(): JobHandle {
    const child: UtilityProcess = utilityProcess.fork(this.entry, [], { serviceName: 'Strata job', stdio: 'ignore' });
    const exited = new Promise<JobExit>((r) => child.once('exit', (code) => r({ code, signal: null })));
    let listener: ((m: FromJob) => void) | null = null;
    child.on('message', (m) => listener?.(parseFromJob(m)));
    return {
      get pid() { return child.pid; },
      send: (msg: ToJob) => {
        if (msg.type === 'run' && win && !win.isDestroyed()) {
          const { port1, port2 } = new MessageChannelMain();
          child.postMessage({ type: 'window-port' }, [port1]);
          win.webContents.postMessage('strata:job-port', { id: msg.id }, [port2]);
        }
        child.postMessage(msg);
      },
      onMessage: (fn) => { listener = fn; },
      exited,
      kill: () => { child.kill(); },
    };
  }
}

protocol.registerSchemesAsPrivileged([{ scheme: 'strata', privileges: { standard: true, secure: true, supportFetchAPI: false, corsEnabled: false } }]);

if (!app.requestSingleInstanceLock()) {
  app.quit();
} else {
  app.on('second-instance', () => { if (win) { if (win.isMinimized()) win.restore(); win.focus(); } });
  void app.whenReady().then(start);
}

async function start(): Promise<void> {
  const dist = resolve(__dirname, '..');
  const root = realpathSync(join(dist, 'renderer'));
  const log = (line: string) => process.stderr.write(`strata: ${line}\n`);

  // Only the app's own files, each with the CSP; nothing else on that scheme.
  protocol.handle('strata', (req) => {
    const url = new URL(req.url);
    if (url.host !== 'app') return new Response('Not found', { status: 404 });
    const rel = url.pathname === '/' ? 'index.html' : decodeURIComponent(url.pathname).replace(/^\/+/, '');
    const file = resolve(root, rel);
    if (!file.startsWith(root + sep) || !existsSync(file)) return new Response('Not found', { status: 404 });
    return new Response(readFileSync(file), { headers: { 'content-type': TYPES[extname(file)] ?? 'application/octet-stream', 'content-security-policy': CSP, 'x-content-type-options': 'nosniff' } });
  });
  session.defaultSession.setPermissionRequestHandler((_wc, _permission, callback) => callback(false));
  session.defaultSession.setPermissionCheckHandler(() => false);
  session.defaultSession.webRequest.onHeadersReceived((details, callback) => {
    callback({ responseHeaders: { ...details.responseHeaders, 'Content-Security-Policy': [CSP] } });
  });
  app.on('web-contents-created', (_e, contents) => {
    contents.on('will-navigate', (e) => e.preventDefault());
    contents.on('will-redirect', (e) => e.preventDefault());
    contents.on('will-attach-webview', (e) => e.preventDefault());
    contents.setWindowOpenHandler(() => ({ action: 'deny' }));
  });

  const services = await AppServices.create({ dataDir: app.getPath('userData'), mode: 'electron', host: new UtilityJobHost(join(__dirname, 'job-process.cjs')), demo: process.argv.includes('--demo'), log });
  const dispatch = createDispatcher(services, log);
  const conn = new Connection(dispatch, (text) => { if (win && !win.isDestroyed()) win.webContents.send('strata:event', text); });

  ipcMain.handle('strata:request', async (event, text: unknown) => {
    if (!win || event.sender !== win.webContents || !trustedSender(event.senderFrame?.url, event.senderFrame === win.webContents.mainFrame)) {
      return JSON.stringify({ type: 'response', id: null, ok: false, error: { kind: 'protocol', message: 'request from an untrusted frame' } });
    }
    const s = typeof text === 'string' ? text : '';
    return new Promise<string>((deliver) => { void conn.request(typeof text === 'string' ? s : { notText: true }, Buffer.byteLength(s), deliver); });
  });
  ipcMain.handle('strata:choose', async (event, kind: unknown) => {
    if (!win || event.sender !== win.webContents) return null;
    const r = await dialog.showOpenDialog(win, { properties: kind === 'file' ? ['openFile'] : ['openDirectory'], title: kind === 'file' ? 'Choose an image' : 'Choose a folder of images' });
    return r.canceled ? null : r.filePaths[0] ?? null;
  });

  services.on((event, data) => {
    if (event === 'job') {
      const r = data as { id: string; state: string; title: string; error: { message: string } | null; summary: string | null };
      if ((r.state === 'succeeded' || r.state === 'failed') && Notification.isSupported()) {
        new Notification({ title: `${r.title}: ${r.state === 'succeeded' ? 'done' : 'failed'}`, body: r.error?.message ?? r.summary ?? '' }).show();
      }
    }
    conn.event(event, data, () => JSON.stringify({ type: 'event', event, data }));
  });

  win = new BrowserWindow(windowOptions(join(__dirname, 'preload.cjs')));
  win.once('ready-to-show', () => win?.show());
  win.on('closed', () => { win = null; });
  await win.loadURL(`${APP_ORIGIN}/`);

  let quitting = false;
  app.on('before-quit', (e) => {
    if (quitting) return;
    e.preventDefault();
    quitting = true;
    // Running jobs are cancelled and reach their consistent state before the app ends.
    void services.close().finally(() => app.exit(0));
  });
  app.on('window-all-closed', () => app.quit());
  process.on('uncaughtException', (err) => log(`unexpected: ${err.stack ?? err.message}`));
}
