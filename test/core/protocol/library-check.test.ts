// The hand-written library check against the zod schema it stands in for: on random valid
// snapshots and on the same snapshots broken at a random member, both give the same verdict,
// and where they accept, the same result (unknown members dropped).
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { LibrarySnapshotSchema } from '../../../core/protocol/library';
import { checkLibrarySnapshot, LibraryCheckError } from '../../../core/protocol/library-check';
import { PROBLEM_CODES } from '../../../core/library/types';

const str = fc.string({ maxLength: 12 });
const num = fc.oneof(fc.integer(), fc.double({ noNaN: true, noDefaultInfinity: true }));
const nullable = <T>(a: fc.Arbitrary<T>) => fc.option(a, { nil: null });
const code = fc.constantFrom(...PROBLEM_CODES);
const fmt = fc.constantFrom('qcow2' as const, 'raw' as const);

const image = fc.record({
  path: str, realPath: str, dev: num, ino: num,
  format: nullable(fmt),
  error: nullable(fc.record({ code: fc.constantFrom('damaged' as const, 'unreadable' as const), message: str })),
  virtualSize: num, actualSize: num, fileSize: num, clusterSize: nullable(num),
  compat: nullable(fc.constantFrom('0.10' as const, '1.1' as const)),
  extendedL2: fc.boolean(),
  compressionType: nullable(fc.constantFrom('zlib' as const, 'zstd' as const)),
  refcountBits: nullable(num), lazyRefcounts: fc.boolean(), snapshots: num, bitmaps: num,
  dirty: fc.boolean(), corrupt: fc.boolean(), backingName: nullable(str), backingFormat: nullable(str),
  hasData: nullable(fc.boolean()), mtimeMs: num, birthtimeMs: nullable(num), external: fc.boolean(),
  backingPath: nullable(str), backingRelative: fc.boolean(), backing: nullable(str),
  children: fc.array(str, { maxLength: 3 }),
  inUse: nullable(fc.record({ pid: num, program: str, vm: nullable(str) })),
  problems: fc.array(fc.record({ code, message: str }), { maxLength: 2 }),
  fixes: fc.array(fc.record({
    problem: code, description: str, command: fc.array(str, { maxLength: 3 }),
    job: fc.oneof(
      fc.record({ op: fc.constant('rebase' as const), image: str, backing: str, backingFormat: fmt, unsafe: fc.constant(true as const) }),
      fc.record({ op: fc.constant('check' as const), image: str, repair: fc.constant('all' as const) }),
    ),
  }), { maxLength: 2 }),
  candidates: fc.array(fc.record({ path: str, format: fmt, virtualSize: num, reason: str }), { maxLength: 2 }),
});

const snapshot = fc.record({
  scanned: fc.array(str, { maxLength: 2 }),
  images: fc.array(image, { maxLength: 3 }),
  treeRoots: fc.array(str, { maxLength: 2 }),
  summary: fc.record({ images: num, bases: num, sharedBases: num, overlays: num, standalone: num, withProblems: num, inUse: num, totalActualSize: num }),
  warnings: fc.array(str, { maxLength: 2 }),
});

/** Every place in a JSON value: [container, key] pairs, the root's members included. */
function places(v: unknown, out: [Record<string, unknown> | unknown[], string | number][] = []): typeof out {
  if (Array.isArray(v)) v.forEach((x, i) => { out.push([v, i]); places(x, out); });
  else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) { out.push([v as Record<string, unknown>, k]); places(x, out); }
  return out;
}

const BAD: unknown[] = [undefined, null, '', 'raw', 'x', 0, -1.5, 1e300, Infinity, NaN, true, false, [], {}, ['x'], { a: 1 }, '1.1', 'check', 'dirty'];

function verdicts(v: unknown): { zod: unknown; fast: unknown } {
  const z = LibrarySnapshotSchema.safeParse(structuredClone(v));
  let fast: unknown;
  try { fast = { ok: checkLibrarySnapshot(structuredClone(v)) }; } catch (err) {
    if (!(err instanceof LibraryCheckError)) throw err;
    fast = { error: err.message };
  }
  return { zod: z.success ? { ok: z.data } : { error: true }, fast: 'ok' in (fast as object) ? fast : { error: true } };
}

describe('checkLibrarySnapshot', () => {
  it('accepts what the schema accepts, with the same result', () => {
    fc.assert(fc.property(snapshot, (s) => {
      const { zod, fast } = verdicts(s);
      expect(fast).toEqual(zod);
      expect('ok' in (zod as object)).toBe(true);
    }), { numRuns: 300 });
  });

  it('gives the schema\'s verdict on a snapshot broken at any member, or given one more', () => {
    fc.assert(fc.property(snapshot, fc.nat(), fc.constantFrom(...BAD.keys()), fc.boolean(), (s, at, bad, add) => {
      const all = places(s);
      if (!all.length) return;
      const [where, key] = all[at % all.length]!;
      if (add && !Array.isArray(where)) (where as Record<string, unknown>)[`extra${at % 3}`] = BAD[bad];
      else if (BAD[bad] === undefined && !Array.isArray(where)) delete (where as Record<string, unknown>)[key as string];
      else (where as Record<string | number, unknown>)[key] = BAD[bad];
      const { zod, fast } = verdicts(s);
      expect(fast).toEqual(zod);
    }), { numRuns: 2000 });
  });

  it('names the member that is wrong', () => {
    const s = fc.sample(snapshot.filter((x) => x.images.length > 0), { numRuns: 1, seed: 7 })[0]!;
    (s.images[0] as Record<string, unknown>).virtualSize = 'big';
    expect(() => checkLibrarySnapshot(s)).toThrow('images.0.virtualSize: expected a number, got string');
    expect(() => checkLibrarySnapshot(null)).toThrow('message: expected an object, got null');
  });
});
