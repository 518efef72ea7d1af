// The preload: the renderer's whole window on the outside world, as window.strata. Messages
// are protocol text; the main process validates every one, and the renderer every reply.
import { contextBridge, ipcRenderer } from 'electron';

type Listener = (message: string) => void;
const listeners = new Set<Listener>();

ipcRenderer.on('strata:event', (_e, message: unknown) => {
  if (typeof message !== 'string') return;
  for (const l of listeners) l(message);
});

// A job's progress comes straight from its process over a MessagePort, not through main.
ipcRenderer.on('strata:job-port', (e, meta: unknown) => {
  const id = typeof (meta as { id?: unknown })?.id === 'string' ? (meta as { id: string }).id : null;
  const port = e.ports[0];
  if (!id || !port) return;
  port.onmessage = (m: { data: unknown }) => {
    const data = m.data as { type?: unknown; progress?: unknown };
    if (data?.type !== 'progress') return;
    const text = JSON.stringify({ type: 'event', event: 'progress', data: { id, progress: data.progress } });
    for (const l of listeners) l(text);
  };
  port.start();
});

contextBridge.exposeInMainWorld('strata', {
  request: (message: string): Promise<string> => ipcRenderer.invoke('strata:request', String(message)),
  onMessage: (fn: Listener): (() => void) => {
    listeners.add(fn);
    return () => listeners.delete(fn);
  },
  choose: (kind: 'folder' | 'file'): Promise<string | null> => ipcRenderer.invoke('strata:choose', kind === 'file' ? 'file' : 'folder'),
});
