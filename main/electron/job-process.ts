// A job process under Electron (utilityProcess): the same job code as under plain Node, with
// Electron's parent port. Progress goes to the window over the MessagePort main hands over.
import { serveJob, type JobPort } from '../job-process/runner';
import type { FromJob } from '../../core/protocol/job-process';

interface ParentPort {
  postMessage(msg: unknown): void;
  on(event: 'message', fn: (e: { data: unknown; ports: { postMessage(m: unknown): void; start(): void }[] }) => void): void;
}

const parent = (process as unknown as { parentPort?: ParentPort }).parentPort;
if (!parent) throw new Error('the Electron job process must be started by Strata');

let windowPort: { postMessage(m: unknown): void } | null = null;
const handlers: ((raw: unknown) => void)[] = [];
parent.on('message', (e) => {
  const d = e.data as { type?: unknown };
  if (d?.type === 'window-port' && e.ports[0]) {
    windowPort = e.ports[0];
    e.ports[0].start();
    return;
  }
  for (const h of handlers) h(e.data);
});

const port: JobPort = {
  post: (m: FromJob) => {
    if (m.type === 'progress' && windowPort) windowPort.postMessage(m);
    else parent.postMessage(m);
  },
  onMessage: (fn) => { handlers.push(fn); },
};

process.on('SIGINT', () => {});
void serveJob(port).then(() => setTimeout(() => process.exit(0), 50));
