// The library snapshot checked by hand, for the renderer: the same rules as LibrarySnapshotSchema
// (library.ts), at a fraction of the cost. The page runs under a CSP without 'unsafe-eval', so zod
// cannot compile its schemas there and walks them generically; for a library of 2,000 images
// (1.7 MB of JSON) that walk, and the garbage it leaves, was the largest part of the time between
// the reply's arrival and the drawn tree. The rules are written once more here, as closures, and a
// property test (test/core/protocol/library-check.test.ts) holds them to the schema: the same
// verdict on valid and broken snapshots, the same result.
//
// Like a zod object, a checked object loses the members the schema does not name; unlike zod, the
// check works in place (the input is JSON the caller has just parsed and owns).
import { PROBLEM_CODES, type LibrarySnapshot } from '../library/types';

export class LibraryCheckError extends Error {
  constructor(readonly path: string, what: string) {
    super(`${path || 'message'}: ${what}`);
  }
}

/** A check returns nothing when the value is right, or where (innermost last) and what is wrong. */
type Failure = { path: (string | number)[]; what: string };
type Check = (v: unknown) => Failure | undefined;

const kind = (v: unknown) => (v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v);
const wrong = (what: string, v: unknown): Failure => ({ path: [], what: `expected ${what}, got ${kind(v)}` });

const str: Check = (v) => (typeof v === 'string' ? undefined : wrong('a string', v));
const num: Check = (v) => (typeof v === 'number' && Number.isFinite(v) ? undefined : wrong('a number', v));
const bool: Check = (v) => (typeof v === 'boolean' ? undefined : wrong('a boolean', v));
const nullable = (c: Check): Check => (v) => (v === null ? undefined : c(v));
const oneOf = (values: readonly unknown[]): Check => {
  const set = new Set(values);
  const what = `one of ${values.map((x) => JSON.stringify(x)).join(', ')}`;
  return (v) => (set.has(v) ? undefined : { path: [], what: `expected ${what}` });
};
const arr = (c: Check): Check => (v) => {
  if (!Array.isArray(v)) return wrong('an array', v);
  for (let i = 0; i < v.length; i++) {
    const f = c(v[i]);
    if (f) { f.path.unshift(i); return f; }
  }
  return undefined;
};
const obj = (shape: Record<string, Check>): Check => {
  const keys = Object.keys(shape);
  const checks = keys.map((k) => shape[k]!);
  const known = new Set(keys);
  return (v) => {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) return wrong('an object', v);
    const o = v as Record<string, unknown>;
    // A member that is missing reads as undefined, which no check here accepts.
    for (let i = 0; i < keys.length; i++) {
      const f = checks[i]!(o[keys[i]!]);
      if (f) { f.path.unshift(keys[i]!); return f; }
    }
    let n = 0;
    for (const k in o) n++;
    if (n !== keys.length) for (const k of Object.keys(o)) if (!known.has(k)) delete o[k];
    return undefined;
  };
};
/** The first of `options` that accepts the value (a zod union without a discriminator). */
const union = (options: Check[]): Check => (v) => (options.some((c) => !c(v)) ? undefined : { path: [], what: 'matches none of the allowed shapes' });

const problemCode = oneOf(PROBLEM_CODES);
const holder = obj({ pid: num, program: str, vm: nullable(str) });
const format = oneOf(['qcow2', 'raw']);

const image = obj({
  path: str,
  realPath: str,
  dev: num,
  ino: num,
  format: nullable(format),
  error: nullable(obj({ code: oneOf(['damaged', 'unreadable']), message: str })),
  virtualSize: num,
  actualSize: num,
  fileSize: num,
  clusterSize: nullable(num),
  compat: nullable(oneOf(['0.10', '1.1'])),
  extendedL2: bool,
  compressionType: nullable(oneOf(['zlib', 'zstd'])),
  refcountBits: nullable(num),
  lazyRefcounts: bool,
  snapshots: num,
  bitmaps: num,
  dirty: bool,
  corrupt: bool,
  backingName: nullable(str),
  backingFormat: nullable(str),
  hasData: nullable(bool),
  mtimeMs: num,
  birthtimeMs: nullable(num),
  external: bool,
  backingPath: nullable(str),
  backingRelative: bool,
  backing: nullable(str),
  children: arr(str),
  inUse: nullable(holder),
  problems: arr(obj({ code: problemCode, message: str })),
  fixes: arr(obj({
    problem: problemCode,
    description: str,
    command: arr(str),
    job: union([
      obj({ op: oneOf(['rebase']), image: str, backing: str, backingFormat: format, unsafe: oneOf([true]) }),
      obj({ op: oneOf(['check']), image: str, repair: oneOf(['all']) }),
    ]),
  })),
  candidates: arr(obj({ path: str, format, virtualSize: num, reason: str })),
});

const snapshot = obj({
  scanned: arr(str),
  images: arr(image),
  treeRoots: arr(str),
  summary: obj({
    images: num, bases: num, sharedBases: num, overlays: num, standalone: num,
    withProblems: num, inUse: num, totalActualSize: num,
  }),
  warnings: arr(str),
});

/** `value` as a LibrarySnapshot, or a LibraryCheckError naming the first member that is wrong. */
export function checkLibrarySnapshot(value: unknown): LibrarySnapshot {
  const f = snapshot(value);
  if (f) throw new LibraryCheckError(f.path.join('.'), f.what);
  return value as LibrarySnapshot;
}
