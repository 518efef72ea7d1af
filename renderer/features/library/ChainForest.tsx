// The main view: every chain as a tree (base on the left, overlays to its right, a shared base
// drawn once with all its children), laid out by d3-hierarchy. Only the trees in view are
// drawn, so hundreds of images scroll smoothly. Arrow keys move through the tree (up/down in
// reading order, left to the backing file, right to the first overlay), Enter opens details,
// the context-menu key or a right click opens the actions.
import { memo, useCallback, useEffect, useLayoutEffect, useMemo, useRef, useState, type KeyboardEvent, type MouseEvent } from 'react';
import { CARD_H, COMPACT_CARD_W, SECTION_H, SECTION_TITLES, layoutGroups, readingOrder, stackGroups, type Filter, type Group, type LaidNode } from './model';
import { badgesFor } from './badges';
import { Badge, Icon } from '../../components/ui';
import { select, openDialog, useStore, type LibraryImage } from '../../lib/store';
import { baseName, size } from '../../lib/format';
import { ActionMenu } from './ActionMenu';

const OVERSCAN = 600;

export function ChainForest({ filter }: { filter: Filter }) {
  const library = useStore((s) => s.library);
  const selected = useStore((s) => s.selected);
  const scroller = useRef<HTMLDivElement>(null);
  const [view, setView] = useState({ top: 0, height: 800, width: 1000 });
  const [focus, setFocus] = useState<string | null>(null);
  const [menu, setMenu] = useState<{ image: LibraryImage; x: number; y: number } | null>(null);

  const laid = useMemo(() => (library ? layoutGroups(library, filter) : []), [library, filter]);
  const stacked = useMemo(() => stackGroups(laid, view.width), [laid, view.width]);
  const order = useMemo(() => readingOrder(stacked.groups), [stacked]);
  const index = useMemo(() => new Map(order.map((n, i) => [n.image.realPath, i])), [order]);
  const nodeOf = useMemo(() => new Map(order.map((n) => [n.image.realPath, n])), [order]);
  const groupOf = useMemo(() => {
    const m = new Map<string, Group>();
    for (const g of stacked.groups) for (const n of g.nodes) m.set(n.image.realPath, g);
    return m;
  }, [stacked]);

  useLayoutEffect(() => {
    const el = scroller.current!;
    const update = () => setView({ top: el.scrollTop, height: el.clientHeight, width: el.clientWidth });
    update();
    const ro = new ResizeObserver(update);
    ro.observe(el);
    el.addEventListener('scroll', update, { passive: true });
    return () => { ro.disconnect(); el.removeEventListener('scroll', update); };
  }, []);

  // The tab stop: the focused node, else the selected one, else the first.
  const tabStop = focus && index.has(focus) ? focus : selected && index.has(selected) ? selected : order[0]?.image.realPath ?? null;

  const reveal = (key: string) => {
    const n = nodeOf.get(key);
    const g = groupOf.get(key);
    const el = scroller.current;
    if (!n || !g || !el) return;
    const top = g.top + n.y;
    if (top < el.scrollTop) el.scrollTop = top - 8;
    else if (top + CARD_H > el.scrollTop + el.clientHeight) el.scrollTop = top + CARD_H - el.clientHeight + 8;
    const left = g.left + n.depth * stacked.colW;
    if (left < el.scrollLeft) el.scrollLeft = left - 8;
    else if (left + stacked.cardW > el.scrollLeft + el.clientWidth) el.scrollLeft = left + stacked.cardW - el.clientWidth + 8;
  };

  const moveTo = (key: string | undefined | null) => {
    if (!key) return;
    setFocus(key);
    reveal(key);
  };

  // Once the node is drawn (it may have been outside the drawn window), give it focus.
  useEffect(() => {
    if (!focus) return;
    const el = scroller.current?.querySelector<HTMLElement>(`[data-key="${CSS.escape(focus)}"]`);
    if (el && document.activeElement !== el && scroller.current?.contains(document.activeElement)) el.focus();
  });

  const onKey = (e: KeyboardEvent, n: LaidNode) => {
    const i = index.get(n.image.realPath)!;
    switch (e.key) {
      case 'ArrowDown': e.preventDefault(); moveTo(order[i + 1]?.image.realPath); break;
      case 'ArrowUp': e.preventDefault(); moveTo(order[i - 1]?.image.realPath); break;
      case 'ArrowLeft': e.preventDefault(); moveTo(n.parent); break;
      case 'ArrowRight': e.preventDefault(); moveTo(n.image.children.find((c) => index.has(c))); break;
      case 'Home': e.preventDefault(); moveTo(order[0]?.image.realPath); break;
      case 'End': e.preventDefault(); moveTo(order[order.length - 1]?.image.realPath); break;
      case 'Enter': case ' ': e.preventDefault(); select(n.image.realPath); break;
      case 'ContextMenu': {
        e.preventDefault();
        const r = (e.currentTarget as HTMLElement).getBoundingClientRect();
        setMenu({ image: n.image, x: r.left + 24, y: r.bottom });
        break;
      }
      default:
        if (e.key === 'F10' && e.shiftKey) {
          e.preventDefault();
          const r = (e.currentTarget as HTMLElement).getBoundingClientRect();
          setMenu({ image: n.image, x: r.left + 24, y: r.bottom });
        }
    }
  };

  // Stable handlers: a click then redraws only the cards whose selection or tab stop changed.
  const keyRef = useRef(onKey);
  keyRef.current = onKey;
  const handleKey = useCallback((e: KeyboardEvent, n: LaidNode) => keyRef.current(e, n), []);
  const handleMenu = useCallback((image: LibraryImage, e: MouseEvent) => { e.preventDefault(); setMenu({ image, x: e.clientX, y: e.clientY }); }, []);

  const visible = stacked.groups.filter((g) => g.top + g.height >= view.top - OVERSCAN && g.top <= view.top + view.height + OVERSCAN);
  const headers = stacked.headers.filter((h) => h.top + SECTION_H >= view.top - OVERSCAN && h.top <= view.top + view.height + OVERSCAN);

  return (
    <div ref={scroller} className="relative h-full overflow-auto" data-testid="chain-forest">
      {library && stacked.groups.length === 0 && (
        <p className="p-8 text-sm text-slate-500 dark:text-slate-400">{library.images.length ? 'No image matches the filter.' : 'No images found in these folders yet.'}</p>
      )}
      <div className="relative" style={{ height: stacked.height + 16, width: stacked.width + 48 }}>
        {headers.map((h) => (
          <div key={h.section} className="absolute left-6 flex items-baseline gap-3" style={{ top: h.top + 10 }}>
            <h2 className="text-xs font-semibold uppercase tracking-wide text-slate-500 dark:text-slate-400">
              {SECTION_TITLES[h.section]} <span className="font-normal normal-case">({h.count})</span>
            </h2>
            {h.section === 'chains' && <span className="text-xs text-slate-500 dark:text-slate-400">Each base is on the left; the lines lead to the overlays that read through it.</span>}
          </div>
        ))}
        <div role="tree" aria-label="Images and their backing chains" className="absolute inset-0">
          {visible.map((g) => (
            <GroupView key={g.key} group={g} colW={stacked.colW} cardW={stacked.cardW} selected={selected} tabStop={tabStop} onFocusNode={setFocus} onKey={handleKey} onMenu={handleMenu} />
          ))}
        </div>
      </div>
      {menu && <ActionMenu image={menu.image} x={menu.x} y={menu.y} onClose={() => setMenu(null)} />}
    </div>
  );
}

const GroupView = memo(function GroupView({ group, colW, cardW, selected, tabStop, onFocusNode, onKey, onMenu }: {
  group: Group; colW: number; cardW: number; selected: string | null; tabStop: string | null;
  onFocusNode: (k: string) => void; onKey: (e: KeyboardEvent, n: LaidNode) => void; onMenu: (img: LibraryImage, e: MouseEvent) => void;
}) {
  const width = group.depth * colW + cardW;
  return (
    <div className="absolute" style={{ top: group.top, left: 24 + group.left, width, height: group.height }} role="group" aria-label={`chain of ${baseName(group.nodes[0]!.image.path)}`}>
      <svg className="pointer-events-none absolute inset-0 overflow-visible" width={width} height={group.height} aria-hidden="true">
        {group.edges.map(({ from, to }) => {
          const x1 = from.depth * colW + cardW;
          const y1 = from.y + CARD_H / 2;
          const x2 = to.depth * colW;
          const y2 = to.y + CARD_H / 2;
          const mid = x1 + (x2 - x1) / 2;
          const dim = !to.matches && !from.matches;
          return <path key={to.image.realPath} d={`M${x1},${y1} H${mid} V${y2} H${x2}`} fill="none" strokeWidth={2}
            className={dim ? 'stroke-slate-200 dark:stroke-slate-800' : 'stroke-slate-400 dark:stroke-slate-500'} />;
        })}
      </svg>
      {group.nodes.map((n) => (
        <NodeCard key={n.image.realPath} node={n} left={n.depth * colW} width={cardW} selected={selected === n.image.realPath} tabbable={tabStop === n.image.realPath}
          onFocusNode={onFocusNode} onKey={onKey} onMenu={onMenu} />
      ))}
    </div>
  );
});

/** Redrawn only when its own image, selection or tab stop changes (a click changes two cards). */
const NodeCard = memo(function NodeCard({ node, left, width, selected, tabbable, onFocusNode, onKey, onMenu }: {
  node: LaidNode; left: number; width: number; selected: boolean; tabbable: boolean;
  onFocusNode: (k: string) => void; onKey: (e: KeyboardEvent, n: LaidNode) => void; onMenu: (img: LibraryImage, e: MouseEvent) => void;
}) {
  const img = node.image;
  const badges = badgesFor(img);
  const serious = img.problems.some((p) => p.code !== 'in-use' && p.code !== 'backing-changed' && p.code !== 'backing-format-unspecified' && p.code !== 'dirty');
  const name = baseName(img.path);
  const compact = width < COMPACT_CARD_W;
  return (
    <div
      role="treeitem"
      aria-level={node.depth + 1}
      aria-selected={selected}

      tabIndex={tabbable ? 0 : -1}
      data-key={img.realPath}
      data-testid="image-node"
      data-name={name}
      data-parent={node.parent ? baseName(node.parent) : ''}
      onFocus={() => onFocusNode(img.realPath)}
      onKeyDown={(e) => onKey(e, node)}
      onClick={() => select(img.realPath)}
      onContextMenu={(e) => onMenu(img, e)}
      className={`absolute flex cursor-pointer flex-col gap-1 overflow-hidden rounded-lg border bg-white px-3 py-2.5 shadow-sm transition-colors dark:bg-slate-900
        ${selected ? 'border-teal-600 ring-2 ring-teal-600/40 dark:border-teal-400' : serious ? 'border-red-300 dark:border-red-800' : 'border-slate-200 hover:border-slate-400 dark:border-slate-700 dark:hover:border-slate-500'}
        ${node.matches ? '' : 'opacity-45'}`}
      style={{ left, top: node.y, width, height: CARD_H }}
      title={img.path}
    >
      <div className="flex min-w-0 items-center gap-2">
        <Icon name={img.inUse ? 'lock' : img.children.length ? 'layers' : 'disk'} className={`h-4 w-4 ${img.inUse ? 'text-sky-600 dark:text-sky-400' : 'text-slate-500 dark:text-slate-400'}`} />
        <span className="min-w-0 flex-1 truncate text-sm font-semibold">{name}</span>
        {img.format && !(compact && img.format === 'qcow2') && <span className="font-mono text-[11px] uppercase text-slate-500 dark:text-slate-400">{img.format}</span>}
      </div>
      <div className="truncate text-xs tabular-nums text-slate-600 dark:text-slate-300">
        {!img.format ? img.error?.message ?? 'not readable'
          : compact ? <span title={`${size(img.actualSize)} on disk of a ${size(img.virtualSize)} virtual disk`}>{size(img.actualSize)} of {size(img.virtualSize)}</span>
          : <>{size(img.virtualSize)} virtual · {size(img.actualSize)} on disk</>}
      </div>
      {/* Read with the name (the badges are drawn for the eye, and said here in words). */}
      <span className="sr-only" data-testid="node-summary">
        {img.format ?? 'unreadable'}{img.format ? `, ${size(img.virtualSize)}` : ''}{img.children.length ? `, used by ${img.children.length} overlay${img.children.length > 1 ? 's' : ''}` : ''}{badges.length ? `; ${badges.map((b) => b.label).join(', ')}` : ''}
      </span>
      <div className="flex min-w-0 gap-1 overflow-hidden" aria-hidden="true">
        {badges.slice(0, 4).map((b) => (
          b.problem
            ? <button key={b.key} type="button" tabIndex={-1} title={`${b.title} — click for the fix`} onClick={(e) => { e.stopPropagation(); openDialog({ kind: 'fix', image: img.realPath, problem: b.problem! }); }}>
                <Badge tone={b.tone}>{b.label} · fix</Badge>
              </button>
            : <Badge key={b.key} tone={b.tone} title={b.title}>{b.label}</Badge>
        ))}
        {badges.length > 4 && <Badge tone="neutral" title={badges.slice(4).map((b) => b.label).join(', ')}>+{badges.length - 4}</Badge>}
      </div>
    </div>
  );
});
