// The renderer's only way out: the typed protocol, over Electron's preload bridge or, in
// browser mode, a WebSocket to `strata serve`. Every reply and event is checked against the
// protocol's schemas before the UI sees it.
import type { EventData, EventMessage, EventName, Method, Params, Response, Result } from '../../core/protocol/rpc';
import { compileChecks, type CheckFailure } from '../../core/protocol/checks';
import { PROTOCOL } from '../../core/protocol/checks.generated';

// Replies, events and the envelope are checked against the protocol's schemas, described as data
// at build time (core/protocol/describe.ts): zod itself is not loaded in the page.
const checks = compileChecks(PROTOCOL);
const has = (o: object, k: string) => Object.prototype.hasOwnProperty.call(o, k);
const said = (f: CheckFailure) => `${f.path.length ? f.path.join('.') : 'message'}: ${f.what}`;

/** What the Electron preload exposes as window.strata (see main/electron/preload.ts). */
export interface StrataBridge {
  request(message: string): Promise<string>;
  onMessage(fn: (message: string) => void): () => void;
  /** The desktop's own file chooser (Electron only): a path, or null when cancelled. */
  choose?(kind: 'folder' | 'file'): Promise<string | null>;
}

/** The desktop's file chooser where there is one (the Electron window); null in a browser. */
export function nativeChooser(): ((kind: 'folder' | 'file') => Promise<string | null>) | null {
  const b = window.strata;
  return b?.choose ? (kind) => b.choose!(kind) : null;
}

declare global {
  interface Window { strata?: StrataBridge }
}

export type ConnectionState = 'connecting' | 'open' | 'closed';

export class ProtocolError extends Error {
  constructor(readonly kind: string, message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

type Pending = { method: Method; resolve: (v: unknown) => void; reject: (e: Error) => void };

interface Transport {
  send(text: string): void;
}

export class Client {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly eventListeners = new Map<EventName, Set<(data: never) => void>>();
  private readonly stateListeners = new Set<(s: ConnectionState) => void>();
  private transport: Transport | null = null;
  private queue: string[] = [];
  state: ConnectionState = 'connecting';

  constructor() {
    if (window.strata) this.useBridge(window.strata);
    else this.connectSocket(0);
  }

  get mode(): 'electron' | 'browser' { return window.strata ? 'electron' : 'browser'; }

  request<M extends Method>(method: M, params: Params<M>): Promise<Result<M>> {
    const id = this.nextId++;
    const text = JSON.stringify({ type: 'request', id, method, params });
    return new Promise<Result<M>>((resolve, reject) => {
      this.pending.set(id, { method, resolve: resolve as (v: unknown) => void, reject });
      if (this.transport && this.state === 'open') this.transport.send(text);
      else this.queue.push(text);
    });
  }

  on<E extends EventName>(event: E, fn: (data: EventData<E>) => void): () => void {
    let set = this.eventListeners.get(event);
    if (!set) this.eventListeners.set(event, (set = new Set()));
    set.add(fn as (data: never) => void);
    return () => set!.delete(fn as (data: never) => void);
  }

  onState(fn: (s: ConnectionState) => void): () => void {
    this.stateListeners.add(fn);
    return () => this.stateListeners.delete(fn);
  }

  private setState(s: ConnectionState): void {
    this.state = s;
    for (const l of this.stateListeners) l(s);
    if (s === 'open') {
      const q = this.queue;
      this.queue = [];
      for (const text of q) this.transport!.send(text);
    }
  }

  private useBridge(bridge: StrataBridge): void {
    this.transport = {
      send: (text) => { void bridge.request(text).then((reply) => this.receive(reply), (err: Error) => this.receive(JSON.stringify({ type: 'response', id: JSON.parse(text).id, ok: false, error: { kind: 'ipc', message: err.message } }))); },
    };
    bridge.onMessage((m) => this.receive(m));
    this.setState('open');
  }

  private connectSocket(attempt: number): void {
    const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`);
    ws.addEventListener('open', () => {
      this.transport = { send: (text) => ws.send(text) };
      this.setState('open');
      attempt = 0;
    });
    ws.addEventListener('message', (e) => this.receive(e.data));
    ws.addEventListener('close', () => {
      this.transport = null;
      this.setState('closed');
      for (const [id, p] of this.pending) { p.reject(new ProtocolError('disconnected', 'the connection to Strata was lost')); this.pending.delete(id); }
      // The server may be restarting: try again, more slowly each time.
      setTimeout(() => this.connectSocket(attempt + 1), Math.min(10_000, 500 * 2 ** attempt));
    });
  }

  private receive(raw: unknown): void {
    let msg: unknown;
    try { msg = typeof raw === 'string' ? JSON.parse(raw) : raw; } catch { return this.complain('a message that is not JSON'); }
    const bad = checks.check(PROTOCOL.envelope, msg);
    if (bad) return this.complain(`a malformed message (${said(bad)})`);
    const m = msg as Response | EventMessage;
    if (m.type === 'event') {
      if (!has(PROTOCOL.events, m.event)) return this.complain(`an unknown event '${m.event}'`);
      const badData = checks.check(PROTOCOL.events[m.event]!, m.data);
      if (badData) return this.complain(`a malformed '${m.event}' event (${said(badData)})`);
      for (const l of this.eventListeners.get(m.event as EventName) ?? []) (l as (d: unknown) => void)(m.data);
      return;
    }
    if (m.id === null) return this.complain(`an error: ${m.ok ? '' : m.error.message}`);
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    if (!m.ok) { p.reject(new ProtocolError(m.error.kind, m.error.message)); return; }
    const badResult = checks.check(PROTOCOL.results[p.method]!, m.result);
    if (badResult) { p.reject(new ProtocolError('protocol', `malformed reply to ${p.method}: ${said(badResult)}`)); return; }
    p.resolve(m.result);
  }

  private warned = new Set<string>();
  private complain(what: string): void {
    if (this.warned.has(what)) return;
    this.warned.add(what);
    // Shown in the UI's log area by the store, not thrown: one bad message must not break the page.
    for (const l of this.stateListeners) l(this.state);
    this.problems.push(`Strata sent ${what}; it was ignored.`);
  }

  /** Protocol problems met so far (the UI shows them). */
  readonly problems: string[] = [];
}
