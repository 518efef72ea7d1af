// The server side of the protocol: one function from a raw message (as it arrived over
// Electron IPC or a WebSocket) to the reply. Oversized, malformed and unknown messages get an
// error reply and are logged once per kind; a handler that throws becomes an error reply.
// Nothing that arrives can crash the process.
import { StrataError } from '../../core/errors';
import { MAX_REQUEST_BYTES, METHODS, RequestSchema, describeIssues, isMethod, type Method, type Response } from '../../core/protocol/rpc';
import type { AppServices } from './app-services';

export interface Dispatcher {
  (raw: unknown, size: number): Promise<Response>;
}

export function createDispatcher(services: Pick<AppServices, 'handlers'>, log: (line: string) => void = () => {}): Dispatcher {
  const logged = new Set<string>();
  const reject = (id: number | null, kind: string, message: string): Response => {
    if (!logged.has(`${kind}:${message}`)) {
      logged.add(`${kind}:${message}`);
      log(`refused a message: ${message}`);
    }
    return { type: 'response', id, ok: false, error: { kind, message } };
  };
  return async (raw, size) => {
    if (size > MAX_REQUEST_BYTES) return reject(null, 'protocol', `message of ${size} bytes is larger than the ${MAX_REQUEST_BYTES} allowed`);
    let msg = raw;
    if (typeof raw === 'string') {
      try { msg = JSON.parse(raw); } catch { return reject(null, 'protocol', 'message is not JSON'); }
    }
    const req = RequestSchema.safeParse(msg);
    if (!req.success) {
      const id = typeof (msg as { id?: unknown })?.id === 'number' ? (msg as { id: number }).id : null;
      return reject(Number.isInteger(id) && (id as number) >= 0 ? id : null, 'protocol', `malformed request: ${describeIssues(req.error)}`);
    }
    const { id, method, params } = req.data;
    if (!isMethod(method)) return reject(id, 'protocol', `unknown method '${method}'`);
    const p = METHODS[method].params.safeParse(params ?? {});
    if (!p.success) return reject(id, 'protocol', `bad parameters for ${method}: ${describeIssues(p.error)}`);
    try {
      const handler = services.handlers[method] as (params: unknown) => unknown;
      const result = await handler(p.data);
      return { type: 'response', id, ok: true, result };
    } catch (err) {
      const kind = err instanceof StrataError ? err.kind : 'internal';
      const message = err instanceof Error ? err.message : String(err);
      if (!(err instanceof StrataError)) log(`${method} failed: ${(err as Error)?.stack ?? message}`);
      return { type: 'response', id, ok: false, error: { kind, message } };
    }
  };
}

export type { Method };

const LIBRARY_METHODS = new Set(['library.get', 'library.rescan']);

/** Whether a raw request asks for the library (its reply is the whole snapshot). */
function asksLibrary(raw: unknown, size: number): boolean {
  if (typeof raw !== 'string' || size > MAX_REQUEST_BYTES) return false;
  try { return LIBRARY_METHODS.has((JSON.parse(raw) as { method?: unknown })?.method as string); } catch { return false; }
}

/**
 * One window or page on the protocol: its requests, their replies and the events it gets, in
 * order. A library event is held back while the page waits for a library reply, which carries the
 * latest snapshot anyway: at start a page asks for the library while the first scan runs, and
 * would otherwise receive, parse and draw the whole library twice (1.7 MB for 2,000 images) when
 * the scan ends. A held event that the reply did not carry follows the reply.
 */
export class Connection {
  private asking = 0;
  private held: { event: string; data: unknown; text: () => string } | null = null;

  constructor(private readonly dispatch: Dispatcher, private readonly sendEvent: (text: string) => void) {}

  /** Handles one request; `deliver` gets the reply's text (and is called once). */
  async request(raw: unknown, size: number, deliver: (text: string) => void): Promise<void> {
    const library = asksLibrary(raw, size);
    if (library) this.asking++;
    let reply: Response;
    try {
      reply = await this.dispatch(raw, size);
    } finally {
      if (library) this.asking--;
    }
    deliver(JSON.stringify(reply));
    const held = this.held;
    if (held && this.asking === 0) {
      this.held = null;
      // After the reply has gone out (Electron sends an invoke's reply a moment after `deliver`).
      if (!(reply.ok && reply.result === held.data)) setImmediate(() => this.sendEvent(held.text()));
    }
  }

  /** An event for this page; `text` is its message (made once for every page). */
  event(event: string, data: unknown, text: () => string): void {
    if (event === 'library' && this.asking > 0) { this.held = { event, data, text }; return; }
    this.sendEvent(text());
  }
}

/** A function that makes `f()` once, when first asked. */
export function once<T>(f: () => T): () => T {
  let done = false;
  let v: T;
  return () => { if (!done) { v = f(); done = true; } return v; };
}
