// The chain view's layout: trees that do not branch are placed directly, exactly where
// d3-hierarchy's tree layout places them; trees that branch go through d3.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { placeTree, placeWithD3, layoutGroups, stackGroups, COL_W, CARD_W, MIN_CARD_W } from '../../renderer/features/library/model';
import type { LibraryImage } from '../../renderer/lib/store';
import type { LibrarySnapshot } from '../../core/library/types';

/** A forest of `n` images: each one's parent is an earlier image or none (-1). */
function forest(parents: number[]): Map<string, LibraryImage> {
  const imgs = parents.map((_, i) => ({ realPath: `/p/${i}`, path: `/p/${i}`, children: [] as string[], problems: [] }) as unknown as LibraryImage);
  parents.forEach((p, i) => { if (p >= 0) imgs[p]!.children.push(`/p/${i}`); });
  return new Map(imgs.map((i) => [i.realPath, i]));
}
const arbParents = fc.integer({ min: 1, max: 12 }).chain((n) => fc.tuple(...Array.from({ length: n }, (_, i) => fc.integer({ min: -1, max: i - 1 }))));
const plain = (ps: ReturnType<typeof placeTree>) => ps.map((p) => ({ path: p.image.realPath, x: p.x, y: p.y, depth: p.depth, parent: p.parent?.realPath ?? null }));

describe('placeTree', () => {
  it('places every tree where d3 places it', () => {
    fc.assert(fc.property(arbParents, (parents) => {
      const byReal = forest(parents);
      parents.forEach((p, i) => {
        if (p !== -1) return;
        const root = byReal.get(`/p/${i}`)!;
        const sort = (a: { path: string }, b: { path: string }) => a.path.localeCompare(b.path);
        expect(plain(placeTree(root, byReal)).sort(sort)).toEqual(plain(placeWithD3(root, byReal)).sort(sort));
      });
    }), { numRuns: 400 });
  });

  it('lays out a row of three without d3, one column per level', () => {
    const byReal = forest([-1, 0, 1]);
    expect(plain(placeTree(byReal.get('/p/0')!, byReal)).map((p) => [p.x, p.y, p.depth])).toEqual([[0, 0, 0], [COL_W, 0, 1], [2 * COL_W, 0, 2]]);
  });

  it('filters whole trees by their nodes', () => {
    const byReal = forest([-1, 0, -1]);
    const snap = { images: [...byReal.values()], treeRoots: ['/p/0', '/p/2'] } as unknown as LibrarySnapshot;
    expect(layoutGroups(snap, { text: '/p/1', problem: '' }).map((g) => g.key)).toEqual(['/p/0']);
    expect(layoutGroups(snap, { text: '', problem: '' }).map((g) => g.nodes.length)).toEqual([2, 1]);
  });
});

describe('stackGroups', () => {
  const snapOf = (parents: number[]) => {
    const byReal = forest(parents);
    const roots = parents.flatMap((p, i) => (p === -1 ? [`/p/${i}`] : []));
    return { images: [...byReal.values()], treeRoots: roots } as unknown as LibrarySnapshot;
  };
  const all = { text: '', problem: '' };

  it('keeps full-size columns when every tree fits', () => {
    const s = stackGroups(layoutGroups(snapOf([-1, 0, 1]), all), 1200);
    expect([s.colW, s.cardW]).toEqual([COL_W, CARD_W]);
  });

  it('narrows the columns so that a three-deep chain is seen whole beside the details panel', () => {
    // 744 px: the chain view of a 1440 px window with the sidebar and the details panel open.
    const s = stackGroups(layoutGroups(snapOf([-1, 0, 1, -1]), all), 744);
    expect(s.colW).toBeLessThan(COL_W);
    expect(s.cardW).toBeGreaterThanOrEqual(MIN_CARD_W);
    expect(s.width).toBeLessThanOrEqual(744 - 48);
  });

  it('stops narrowing at the smallest card: a deeper chain scrolls', () => {
    const s = stackGroups(layoutGroups(snapOf([-1, 0, 1, 2, 3, 4, 5]), all), 744);
    expect(s.cardW).toBe(MIN_CARD_W);
    expect(s.width).toBeGreaterThan(744);
  });
});
