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
