// The page's checks of what the server sends: an interpreter of the protocol's schemas described
// as data (describe.ts, checks.generated.ts), with zod's verdicts and results, without zod.
// A check works in place: like a zod object, a checked object loses the members its schema does
// not name (the input is JSON the caller has just parsed and owns).
import type { Desc, Described, Ref } from './describe';

/** Where (innermost last) and what is wrong. */
export interface CheckFailure { path: (string | number)[]; what: string }

export type Checker = (v: unknown) => CheckFailure | undefined;

const kind = (v: unknown) => (v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v);

/**
 * Builds the checkers of a described protocol. `strip` says whether a check may drop unknown
 * members: never while a union is still trying its options (an option that fails must leave the
 * value as it was for the next one).
 */
export function compileChecks(d: Described): { check(ref: Ref, v: unknown): CheckFailure | undefined } {
  type Fn = (v: unknown, strip: boolean) => CheckFailure | undefined;
  const fns: Fn[] = [];
  const call = (r: Ref): Fn => (v, s) => fns[r]!(v, s);
  const wrong = (what: string, v: unknown): CheckFailure => ({ path: [], what: `expected ${what}, got ${kind(v)}` });
  const build = (x: Desc): Fn => {
    switch (x.t) {
      case 'string': return (v) => {
        if (typeof v !== 'string') return wrong('a string', v);
        if (x.min !== undefined && v.length < x.min) return { path: [], what: `too short (at least ${x.min} characters)` };
        if (x.max !== undefined && v.length > x.max) return { path: [], what: `too long (at most ${x.max} characters)` };
        if (x.noNul && v.includes('\0')) return { path: [], what: 'paths cannot contain NUL bytes' };
        return undefined;
      };
      case 'number': return (v) => {
        if (typeof v !== 'number' || !Number.isFinite(v)) return wrong('a number', v);
        if (x.int && !Number.isSafeInteger(v)) return { path: [], what: 'expected an integer' };
        if ((x.gte !== undefined && v < x.gte) || (x.gt !== undefined && v <= x.gt) || (x.lte !== undefined && v > x.lte) || (x.lt !== undefined && v >= x.lt)) return { path: [], what: `${v} is out of range` };
        return undefined;
      };
      case 'boolean': return (v) => (typeof v === 'boolean' ? undefined : wrong('a boolean', v));
      case 'null': return (v) => (v === null ? undefined : wrong('null', v));
      case 'unknown': return () => undefined;
      case 'literal': {
        const set = new Set<unknown>(x.v);
        const what = `expected ${x.v.map((e) => JSON.stringify(e)).join(' or ')}`;
        return (v) => (set.has(v) ? undefined : { path: [], what });
      }
      case 'nullable': { const of = call(x.of); return (v, s) => (v === null ? undefined : of(v, s)); }
      case 'optional': { const of = call(x.of); return (v, s) => (v === undefined ? undefined : of(v, s)); }
      case 'array': {
        const of = call(x.of);
        return (v, s) => {
          if (!Array.isArray(v)) return wrong('an array', v);
          if (x.min !== undefined && v.length < x.min) return { path: [], what: `too few items (at least ${x.min})` };
          if (x.max !== undefined && v.length > x.max) return { path: [], what: `too many items (at most ${x.max})` };
          for (let i = 0; i < v.length; i++) { const f = of(v[i], s); if (f) { f.path.unshift(i); return f; } }
          return undefined;
        };
      }
      case 'record': {
        const k = call(x.k);
        const val = call(x.v);
        return (v, s) => {
          if (typeof v !== 'object' || v === null || Array.isArray(v)) return wrong('an object', v);
          for (const key of Object.keys(v)) {
            const fk = k(key, s);
            if (fk) { fk.path.unshift(key); return fk; }
            const fv = val((v as Record<string, unknown>)[key], s);
            if (fv) { fv.path.unshift(key); return fv; }
          }
          // zod builds a record anew by assignment, which drops a '__proto__' member (checked
          // all the same): so does the check, which leaves no such member for a later merge.
          if (s && Object.prototype.hasOwnProperty.call(v, '__proto__')) delete (v as Record<string, unknown>)['__proto__'];
          return undefined;
        };
      }
      case 'object': {
        const keys = Object.keys(x.shape);
        const checks = keys.map((k) => call(x.shape[k]!));
        // zod takes a missing member for z.unknown() as missing, not as undefined.
        const present = keys.filter((k) => d.table[x.shape[k]!]!.t === 'unknown');
        const known = new Set(keys);
        return (v, s) => {
          if (typeof v !== 'object' || v === null || Array.isArray(v)) return wrong('an object', v);
          const o = v as Record<string, unknown>;
          for (const k of present) if (!Object.prototype.hasOwnProperty.call(o, k)) return { path: [k], what: 'missing' };
          for (let i = 0; i < keys.length; i++) {
            const f = checks[i]!(o[keys[i]!], s);
            if (f) { f.path.unshift(keys[i]!); return f; }
          }
          let extra: string[] | null = null;
          for (const k in o) if (!known.has(k) && Object.prototype.hasOwnProperty.call(o, k)) (extra ??= []).push(k);
          if (extra) {
            if (x.strict) return { path: [], what: `unknown member${extra.length > 1 ? 's' : ''} ${extra.map((e) => `'${e}'`).join(', ')}` };
            if (s) for (const k of extra) delete o[k];
          }
          return undefined;
        };
      }
      case 'union': {
        const options = x.of.map(call);
        return (v, s) => {
          for (const o of options) if (!o(v, false)) return s ? o(v, true) : undefined;
          return { path: [], what: 'matches none of the allowed shapes' };
        };
      }
    }
  };
  for (const x of d.table) fns.push(build(x));
  return { check: (ref, v) => fns[ref]!(v, true) };
}
