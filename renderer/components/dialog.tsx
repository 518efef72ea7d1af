// Modal dialogs on the platform's <dialog>: the rest of the page is inert while one is open
// (focus stays inside), Escape cancels, and focus returns where it was when it closes.
import { useEffect, useId, useRef, type ReactNode } from 'react';
import { Button, Icon } from './ui';

export function Dialog({ title, onClose, children, footer, wide }: { title: string; onClose: () => void; children: ReactNode; footer?: ReactNode; wide?: boolean }) {
  const ref = useRef<HTMLDialogElement>(null);
  const titleId = useId();
  useEffect(() => {
    const d = ref.current!;
    const before = document.activeElement as HTMLElement | null;
    if (!d.open) d.showModal();
    const cancel = (e: Event) => { e.preventDefault(); onClose(); };
    d.addEventListener('cancel', cancel);
    return () => {
      d.removeEventListener('cancel', cancel);
      if (d.open) d.close();
      before?.focus?.();
    };
  }, [onClose]);
  return (
    <dialog
      ref={ref}
      aria-labelledby={titleId}
      className={`m-auto max-h-[90vh] w-[calc(100vw-2rem)] ${wide ? 'max-w-3xl' : 'max-w-lg'} overflow-hidden rounded-xl border border-slate-200 bg-white p-0 text-slate-900 shadow-2xl backdrop:bg-slate-900/50 dark:border-slate-700 dark:bg-slate-900 dark:text-slate-100`}
    >
      <div className="flex max-h-[90vh] flex-col">
        <header className="flex items-center justify-between gap-4 border-b border-slate-200 px-5 py-3 dark:border-slate-700">
          <h2 id={titleId} className="text-base font-semibold">{title}</h2>
          <Button variant="ghost" small onClick={onClose} aria-label="Close"><Icon name="x" /></Button>
        </header>
        <div className="min-h-0 flex-1 overflow-y-auto px-5 py-4">{children}</div>
        {footer && <footer className="flex items-center justify-end gap-2 border-t border-slate-200 px-5 py-3 dark:border-slate-700">{footer}</footer>}
      </div>
    </dialog>
  );
}
