// Browser mode: the built renderer and the protocol over a WebSocket, on 127.0.0.1 only, behind
// a random per-run token. The token comes in the printed URL once and is then kept in an
// HttpOnly SameSite=Strict cookie; every HTTP and WebSocket request must carry it and a Host
// (and, for the WebSocket and any cross-origin request, an Origin) naming this server.
// Everything else gets 401 or 403. A page from another site can neither read nor drive it.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, realpathSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { extname, join, resolve, sep } from 'node:path';
import { WebSocketServer, type WebSocket } from 'ws';
import { MAX_REQUEST_BYTES } from '../../core/protocol/rpc';
import { NotFoundError } from '../../core/errors';
import type { AppServices } from '../services/app-services';
import { Connection, createDispatcher, once } from '../services/rpc';

export const TOKEN_COOKIE = 'strata_token';

/** The policy the page runs under: our own scripts and styles only, no frames, no plugins. */
export function contentSecurityPolicy(port: number): string {
  return [
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    `connect-src 'self' ws://127.0.0.1:${port} ws://localhost:${port}`,
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "object-src 'none'",
  ].join('; ');
}

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8',
  '.svg': 'image/svg+xml', '.png': 'image/png', '.ico': 'image/x-icon', '.woff2': 'font/woff2', '.json': 'application/json',
};

export interface ServeOptions {
  services: AppServices;
  /** The built renderer (index.html and assets/). */
  root: string;
  port?: number;
  /** A fixed token (tests); a random one otherwise. */
  token?: string;
  log?: (line: string) => void;
}

export interface RunningServer {
  url: string;
  port: number;
  token: string;
  server: Server;
  close(): Promise<void>;
}

function cookieToken(req: IncomingMessage): string | null {
  const header = req.headers.cookie;
  if (!header) return null;
  for (const part of header.split(';')) {
    const [k, ...v] = part.trim().split('=');
    if (k === TOKEN_COOKIE) return v.join('=');
  }
  return null;
}

function sameToken(a: string | null, b: string): boolean {
  if (a === null) return false;
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** Every file under `root` (the built renderer) by its absolute path. */
function loadFiles(root: string): Map<string, Buffer> {
  const files = new Map<string, Buffer>();
  const walk = (dir: string, depth: number) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory() && depth < 8) walk(p, depth + 1);
      else if (e.isFile()) files.set(p, readFileSync(p));
    }
  };
  walk(root, 0);
  return files;
}

export async function startServer(opts: ServeOptions): Promise<RunningServer> {
  const log = opts.log ?? (() => {});
  const token = opts.token ?? randomBytes(24).toString('base64url');
  if (!existsSync(join(opts.root, 'index.html'))) throw new NotFoundError('the app\'s pages are not built here; run `npm run build`', resolve(opts.root));
  const root = realpathSync(resolve(opts.root));
  // The built pages, read once now (a few hundred KiB): served from memory, a page load never
  // waits behind the library scan's file reads in libuv's thread pool, which it shares.
  const files = loadFiles(root);
  const dispatch = createDispatcher(opts.services, log);
  let port = 0;
  const hosts = () => new Set([`127.0.0.1:${port}`, `localhost:${port}`]);
  const origins = () => new Set([`http://127.0.0.1:${port}`, `http://localhost:${port}`]);

  /** Host and Origin name this server (DNS rebinding, cross-site requests). */
  const placeOk = (req: IncomingMessage, needOrigin: boolean): boolean => {
    if (!req.headers.host || !hosts().has(req.headers.host)) return false;
    const origin = req.headers.origin;
    if (origin === undefined) return !needOrigin;
    return origins().has(origin);
  };

  const deny = (res: ServerResponse, status: 401 | 403 | 404 | 405, text: string) => {
    res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', 'cache-control': 'no-store' });
    res.end(text + '\n');
  };

  const server = createServer((req, res) => {
    if (!placeOk(req, false)) return deny(res, 403, 'Forbidden: wrong Host or Origin');
    if (req.method !== 'GET' && req.method !== 'HEAD') return deny(res, 405, 'Method not allowed');
    const url = new URL(req.url ?? '/', `http://127.0.0.1:${port}`);
    const given = url.searchParams.get('token');
    if (given !== null) {
      if (!sameToken(given, token)) return deny(res, 401, 'Unauthorized: wrong token');
      // Trade the URL's token for a cookie, and take it out of the address bar and history.
      res.writeHead(303, {
        location: '/',
        'set-cookie': `${TOKEN_COOKIE}=${token}; HttpOnly; SameSite=Strict; Path=/`,
        'cache-control': 'no-store',
      });
      res.end();
      return;
    }
    if (!sameToken(cookieToken(req), token)) return deny(res, 401, 'Unauthorized: open the URL strata serve printed (it carries the token)');
    const rel = url.pathname === '/' ? 'index.html' : decodeURIComponent(url.pathname).replace(/^\/+/, '');
    const file = resolve(root, rel);
    const body = file.startsWith(root + sep) ? files.get(file) : undefined;
    if (!body) return deny(res, 404, 'Not found');
    res.writeHead(200, {
      'content-type': TYPES[extname(file)] ?? 'application/octet-stream',
      'content-length': body.length,
      'content-security-policy': contentSecurityPolicy(port),
      'x-content-type-options': 'nosniff',
      'referrer-policy': 'no-referrer',
      'cross-origin-opener-policy': 'same-origin',
      'cross-origin-resource-policy': 'same-origin',
      'cache-control': rel === 'index.html' ? 'no-store' : 'max-age=3600',
    });
    res.end(req.method === 'HEAD' ? undefined : body);
  });

  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_REQUEST_BYTES });
  const clients = new Map<WebSocket, Connection>();
  server.on('upgrade', (req, socket, head) => {
    const refuse = (status: number, text: string) => {
      socket.end(`HTTP/1.1 ${status} ${text}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    };
    if (!placeOk(req, true)) return refuse(403, 'Forbidden');
    if (new URL(req.url ?? '/', 'http://x').pathname !== '/ws') return refuse(404, 'Not Found');
    if (!sameToken(cookieToken(req), token)) return refuse(401, 'Unauthorized');
    wss.handleUpgrade(req, socket, head, (ws) => {
      const send = (text: string) => { if (ws.readyState === ws.OPEN) ws.send(text); };
      const conn = new Connection(dispatch, send);
      clients.set(ws, conn);
      ws.on('close', () => clients.delete(ws));
      ws.on('error', () => clients.delete(ws));
      ws.on('message', (data, isBinary) => {
        const size = Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : (data as Buffer).byteLength;
        const text = isBinary ? '' : data.toString();
        void conn.request(isBinary ? { binary: true } : text, size, send);
      });
    });
  });
  // A message larger than maxPayload closes the socket (1009) inside ws: logged, never thrown.
  wss.on('error', (err) => log(`websocket: ${err.message}`));

  const off = opts.services.on((event, data) => {
    if (!clients.size) return;
    const text = once(() => JSON.stringify({ type: 'event', event, data }));
    for (const conn of clients.values()) conn.event(event, data, text);
  });

  await new Promise<void>((resolveListen, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, '127.0.0.1', () => { server.off('error', reject); resolveListen(); });
  });
  port = (server.address() as AddressInfo).port;
  const url = `http://127.0.0.1:${port}/?token=${token}`;
  return {
    url, port, token, server,
    close: () => new Promise<void>((done) => {
      off();
      for (const ws of clients.keys()) ws.terminate();
      wss.close();
      server.close(() => done());
      server.closeAllConnections();
    }),
  };
}
