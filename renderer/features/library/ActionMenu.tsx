// An image's actions: every writing one opens its wizard, which ends in the plan's preview.
// Used as the context menu of a tree node and as the details panel's action list.
import { useEffect, useLayoutEffect, useRef, useState, type KeyboardEvent } from 'react';
import { openDialog, select, type LibraryImage, type WizardOp } from '../../lib/store';

export interface Action {
  op: WizardOp;
  label: string;
  /** Why it cannot run on this image, or null. */
  disabled: string | null;
}

export function actionsFor(img: LibraryImage): Action[] {
  const inUse = img.inUse ? `in use by ${img.inUse.program}` : null;
  const unreadable = !img.format ? 'the image cannot be read' : null;
  const overlay = img.backingName ? null : 'it has no backing file';
  const qcow2 = img.format === 'qcow2' ? null : 'raw images cannot do this';
  const first = (...xs: (string | null)[]) => xs.find((x) => x) ?? null;
  return [
    { op: 'compact', label: 'Compact…', disabled: first(unreadable, inUse) },
    { op: 'commit', label: 'Commit into backing file…', disabled: first(unreadable, overlay, inUse) },
    { op: 'empty', label: 'Empty after commit…', disabled: first(unreadable, overlay, qcow2, inUse) },
    { op: 'merge', label: 'Merge this layer away…', disabled: first(unreadable, overlay, qcow2, inUse) },
    { op: 'rebase', label: 'Rebase…', disabled: first(unreadable, qcow2, inUse) },
    { op: 'check', label: 'Check and repair…', disabled: first(unreadable, qcow2, inUse) },
    { op: 'convert', label: 'Convert…', disabled: unreadable },
    { op: 'resize', label: 'Resize…', disabled: first(unreadable, inUse) },
    { op: 'mirror', label: 'Mirror to…', disabled: unreadable },
    { op: 'snapshot-create', label: 'Create snapshot…', disabled: first(unreadable, qcow2, inUse) },
  ];
}

export function ActionMenu({ image, x, y, onClose }: { image: LibraryImage; x: number; y: number; onClose: () => void }) {
  const ref = useRef<HTMLDivElement>(null);
  const [pos, setPos] = useState({ x, y });
  const actions = actionsFor(image);
  useLayoutEffect(() => {
    const el = ref.current!;
    const r = el.getBoundingClientRect();
    setPos({ x: Math.min(x, window.innerWidth - r.width - 8), y: Math.min(y, window.innerHeight - r.height - 8) });
    el.querySelector<HTMLElement>('[role=menuitem]:not([aria-disabled=true])')?.focus();
  }, [x, y]);
  useEffect(() => {
    const away = (e: Event) => { if (!ref.current?.contains(e.target as Node)) onClose(); };
    window.addEventListener('mousedown', away);
    window.addEventListener('blur', onClose);
    return () => { window.removeEventListener('mousedown', away); window.removeEventListener('blur', onClose); };
  }, [onClose]);
  const items = () => [...ref.current!.querySelectorAll<HTMLElement>('[role=menuitem]')];
  const onKey = (e: KeyboardEvent) => {
    const list = items();
    const i = list.indexOf(document.activeElement as HTMLElement);
    if (e.key === 'Escape' || e.key === 'Tab') { e.preventDefault(); onClose(); }
    else if (e.key === 'ArrowDown') { e.preventDefault(); list[(i + 1) % list.length]?.focus(); }
    else if (e.key === 'ArrowUp') { e.preventDefault(); list[(i - 1 + list.length) % list.length]?.focus(); }
    else if (e.key === 'Home') { e.preventDefault(); list[0]?.focus(); }
    else if (e.key === 'End') { e.preventDefault(); list[list.length - 1]?.focus(); }
  };
  const run = (a: Action) => {
    if (a.disabled) return;
    onClose();
    select(image.realPath);
    openDialog({ kind: 'wizard', op: a.op, image: image.realPath });
  };
  return (
    <div ref={ref} role="menu" aria-label="Image actions" onKeyDown={onKey}
      className="fixed z-40 min-w-56 rounded-lg border border-slate-200 bg-white py-1 text-sm shadow-xl dark:border-slate-700 dark:bg-slate-900"
      style={{ left: pos.x, top: pos.y }}>
      {actions.map((a) => (
        <div key={a.op} role="menuitem" tabIndex={-1} aria-disabled={!!a.disabled} title={a.disabled ?? undefined}
          onClick={() => run(a)} onKeyDown={(e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); run(a); } }}
          className={`px-3 py-1.5 outline-none ${a.disabled ? 'cursor-not-allowed text-slate-400 dark:text-slate-500 dark:text-slate-400' : 'cursor-pointer hover:bg-slate-100 focus:bg-slate-100 dark:hover:bg-slate-800 dark:focus:bg-slate-800'}`}>
          {a.label}
          {a.disabled && <span className="ml-2 text-xs">({a.disabled})</span>}
        </div>
      ))}
    </div>
  );
}
