// The library as the chain view draws it: groups (one per tree: a base with everything that
// stands on it, an orphan with its overlays, a standalone image), laid out with d3-hierarchy's
// tree layout, filtered by name and problem. Pure functions of the snapshot.
import { hierarchy, tree, type HierarchyPointNode } from 'd3-hierarchy';
import type { LibraryImage } from '../../lib/store';
import type { LibrarySnapshot } from '../../../core/library/types';

export const ROW_H = 92;
export const CARD_H = 80;
export const CARD_W = 312;
export const COL_W = 360;
export const GROUP_GAP = 28;
/** The narrowest a card gets, and the gap between columns then, when a deep chain must fit. */
export const MIN_CARD_W = 200;
export const COMPACT_GAP = 32;
/** Cards narrower than this say less: no qcow2 label, sizes as 'on disk of virtual'. */
export const COMPACT_CARD_W = 272;
export const SECTION_H = 36;

export type Section = 'chains' | 'broken' | 'standalone';

export const SECTION_TITLES: Record<Section, string> = {
  chains: 'Chains',
  broken: 'Broken chains (backing file missing, unreadable or looping)',
  standalone: 'Standalone images',
};

export interface LaidNode {
  image: LibraryImage;
  x: number;
  y: number;
  depth: number;
  parent: string | null;
  matches: boolean;
}

export interface Group {
  key: string;
  section: Section;
  nodes: LaidNode[];
  edges: { from: LaidNode; to: LaidNode }[];
  /** The deepest node's depth (0 for a lone image). */
  depth: number;
  /** At full column width (stackGroups may narrow the columns). */
  width: number;
  height: number;
  /** Set by stackGroups: where the group is in the scrolling area. */
  top: number;
  left: number;
}

export interface Filter {
  text: string;
  /** '' = all; 'problems' = any problem; or one problem code; 'in-use'. */
  problem: string;
}

export function matches(img: LibraryImage, f: Filter): boolean {
  const text = f.text.trim().toLowerCase();
  if (text && !img.path.toLowerCase().includes(text)) return false;
  if (f.problem === 'problems') return img.problems.length > 0;
  if (f.problem) return img.problems.some((p) => p.code === f.problem);
  return true;
}

function sectionOf(root: LibraryImage): Section {
  if (root.problems.some((p) => p.code === 'backing-missing' || p.code === 'backing-unreadable' || p.code === 'backing-loop')) return 'broken';
  return root.children.length ? 'chains' : 'standalone';
}

const SECTION_ORDER: Section[] = ['chains', 'broken', 'standalone'];

/** A tree's nodes with their places: x down the tree (depth), y across it, from 0. */
export interface Placed { image: LibraryImage; x: number; y: number; depth: number; parent: LibraryImage | null }

/** d3-hierarchy's tree layout, for trees that branch. */
export function placeWithD3(root: LibraryImage, byReal: Map<string, LibraryImage>): Placed[] {
  const h = hierarchy<LibraryImage>(root, (img) => img.children.map((c) => byReal.get(c)!).filter(Boolean));
  const all = tree<LibraryImage>().nodeSize([ROW_H, COL_W]).separation(() => 1)(h).descendants();
  const minX = Math.min(...all.map((n: HierarchyPointNode<LibraryImage>) => n.x));
  return all.map((n) => ({ image: n.data, x: n.y, y: n.x - minX, depth: n.depth, parent: n.parent ? n.parent.data : null }));
}

/**
 * Where every node of the tree under `root` goes. Most trees do not branch (a standalone
 * image, a base with one overlay, a chain): those are a row, placed here directly, as d3 would
 * place them; a library of thousands of them is laid out in a few milliseconds instead of tens.
 */
export function placeTree(root: LibraryImage, byReal: Map<string, LibraryImage>): Placed[] {
  const row: Placed[] = [];
  const seen = new Set<LibraryImage>();
  for (let n: LibraryImage | undefined = root, parent: LibraryImage | null = null; n; ) {
    if (seen.has(n)) break;
    seen.add(n);
    row.push({ image: n, x: row.length * COL_W, y: 0, depth: row.length, parent });
    const kids: string[] = n.children.filter((c) => byReal.has(c));
    if (kids.length > 1) return placeWithD3(root, byReal);
    parent = n;
    n = kids.length ? byReal.get(kids[0]!) : undefined;
  }
  return row;
}

/** Lays every tree out; a tree without a node that matches the filter is left out. */
export function layoutGroups(snap: LibrarySnapshot, filter: Filter): Group[] {
  const byReal = new Map(snap.images.map((i) => [i.realPath, i as LibraryImage]));
  const groups: Group[] = [];
  for (const rootKey of snap.treeRoots) {
    const root = byReal.get(rootKey);
    if (!root) continue;
    const placed = placeTree(root, byReal);
    const nodes: LaidNode[] = placed.map((p) => ({ image: p.image, x: p.x, y: p.y, depth: p.depth, parent: p.parent ? p.parent.realPath : null, matches: matches(p.image, filter) }));
    if (!nodes.some((n) => n.matches)) continue;
    const laid = new Map(nodes.map((n) => [n.image, n]));
    const edges = placed.filter((p) => p.parent).map((p) => ({ from: laid.get(p.parent!)!, to: laid.get(p.image)! }));
    let maxDepth = 0;
    let maxY = 0;
    for (const n of nodes) { if (n.depth > maxDepth) maxDepth = n.depth; if (n.y > maxY) maxY = n.y; }
    groups.push({ key: rootKey, section: sectionOf(root), nodes, edges, depth: maxDepth, width: maxDepth * COL_W + CARD_W, height: maxY + CARD_H, top: 0, left: 0 });
  }
  groups.sort((a, b) => SECTION_ORDER.indexOf(a.section) - SECTION_ORDER.indexOf(b.section));
  return groups;
}

export interface Stacked {
  groups: Group[];
  /** Column and card widths: narrower than COL_W and CARD_W when the deepest tree needs it. */
  colW: number;
  cardW: number;
  /** Section headers and where they go. */
  headers: { section: Section; top: number; count: number }[];
  height: number;
  width: number;
}

/**
 * Places groups one below the other, with a header where a section starts. Standalone images
 * (groups of one) are set side by side, as many as fit in `width`.
 */
export function stackGroups(groups: Group[], width = 0): Stacked {
  let top = 0;
  let section: Section | null = null;
  const headers: Stacked['headers'] = [];
  const { colW, cardW } = columnsFor(groups, width);
  const perRow = Math.max(1, Math.floor((width - 48 + (colW - cardW)) / colW));
  let col = 0;
  for (const g of groups) {
    if (g.section !== section) {
      if (col > 0) { top += ROW_H + GROUP_GAP - (ROW_H - CARD_H); col = 0; }
      section = g.section;
      headers.push({ section, top, count: groups.filter((x) => x.section === section).length });
      top += SECTION_H;
    }
    if (g.section === 'standalone') {
      g.top = top;
      g.left = col * colW;
      if (++col === perRow) { col = 0; top += g.height + GROUP_GAP; }
      continue;
    }
    g.top = top;
    g.left = 0;
    top += g.height + GROUP_GAP;
  }
  if (col > 0) top += CARD_H + GROUP_GAP;
  return { groups, headers, colW, cardW, height: top, width: Math.max(cardW, ...groups.map((g) => g.left + g.depth * colW + cardW)) };
}

/**
 * Column and card widths for a view `width` wide: the full size when every tree fits, else
 * narrower columns, down to MIN_CARD_W, so that a chain is seen whole next to the details panel
 * (past that depth, the view scrolls sideways).
 */
export function columnsFor(groups: Group[], width: number): { colW: number; cardW: number } {
  let depth = 0;
  for (const g of groups) if (g.depth > depth) depth = g.depth;
  const room = width - 48;
  if (width <= 0 || depth === 0 || depth * COL_W + CARD_W <= room) return { colW: COL_W, cardW: CARD_W };
  const colW = Math.min(COL_W, Math.max(MIN_CARD_W + COMPACT_GAP, Math.floor((room + COMPACT_GAP) / (depth + 1))));
  return { colW, cardW: Math.min(CARD_W, colW - COMPACT_GAP) };
}

/** The nodes in reading order (group by group, each tree top to bottom): keyboard navigation. */
export function readingOrder(groups: Group[]): LaidNode[] {
  return groups.flatMap((g) => [...g.nodes].sort((a, b) => a.y - b.y || a.x - b.x));
}
