// The protocol's zod schemas as plain data, for the renderer's checks (core/protocol/checks.ts).
// The page runs under a CSP without 'unsafe-eval', where zod cannot compile its schemas; loading
// and building them there was a third of what the page's script did before it could draw the
// library, and zod itself a quarter of its code. So the build describes every schema the page
// checks (replies, events, the envelope) as data, once, into checks.generated.ts, and the page
// checks with a small interpreter of that data. A property test holds the two to each other.
//
// Only what the protocol uses is described; anything else (a transform, a refine other than the
// one for paths) stops the build, so the checks can never silently accept less than zod does.
import type { z } from 'zod';
import { EVENTS, METHODS, ServerMessageSchema } from './rpc';

export type Desc =
  | { t: 'string'; min?: number; max?: number; noNul?: true }
  | { t: 'number'; int?: true; gte?: number; gt?: number; lte?: number; lt?: number }
  | { t: 'boolean' } | { t: 'null' } | { t: 'unknown' }
  | { t: 'literal'; v: (string | number | boolean | null)[] }
  | { t: 'nullable'; of: Ref } | { t: 'optional'; of: Ref }
  | { t: 'array'; of: Ref; min?: number; max?: number }
  | { t: 'record'; k: Ref; v: Ref }
  | { t: 'object'; shape: Record<string, Ref>; strict: boolean }
  | { t: 'union'; of: Ref[] };

/** An index into the table of descriptions (shared sub-schemas appear once). */
export type Ref = number;

export interface Described {
  table: Desc[];
  results: Record<string, Ref>;
  events: Record<string, Ref>;
  envelope: Ref;
}

type Def = Record<string, unknown> & { type: string };
const defOf = (s: unknown): Def => (s as { _zod: { def: Def } })._zod.def;

export function describeProtocol(): Described {
  const table: Desc[] = [];
  const index = new Map<string, Ref>();
  const seen = new Map<unknown, Ref>();
  const add = (d: Desc): Ref => {
    const key = JSON.stringify(d);
    let r = index.get(key);
    if (r === undefined) { r = table.length; table.push(d); index.set(key, r); }
    return r;
  };
  const walk = (schema: z.ZodType, where: string): Ref => {
    const known = seen.get(schema);
    if (known !== undefined) return known;
    const def = defOf(schema);
    const checks = (def.checks as { _zod: { def: Record<string, unknown> } }[] | undefined ?? []).map((c) => c._zod.def);
    const fail = (what: string): never => { throw new Error(`${where}: ${what} cannot be described for the page's checks`); };
    let d: Desc;
    switch (def.type) {
      case 'string': {
        const s: Desc & { t: 'string' } = { t: 'string' };
        for (const c of checks) {
          if (c.check === 'min_length') s.min = c.minimum as number;
          else if (c.check === 'max_length') s.max = c.maximum as number;
          else if (c.check === 'custom' && /^\(?\w+\)?\s*=>\s*!\w+\.includes\(["']\\0["']\)$/.test(String(c.fn))) s.noNul = true;
          else fail(`string check ${String(c.check)}`);
        }
        d = s;
        break;
      }
      case 'number': {
        const n: Desc & { t: 'number' } = { t: 'number' };
        for (const c of checks) {
          if (c.check === 'number_format' && c.format === 'safeint') n.int = true;
          else if (c.check === 'greater_than') { if (c.inclusive) n.gte = c.value as number; else n.gt = c.value as number; }
          else if (c.check === 'less_than') { if (c.inclusive) n.lte = c.value as number; else n.lt = c.value as number; }
          else fail(`number check ${String(c.check)} ${String(c.format ?? '')}`);
        }
        d = n;
        break;
      }
      case 'boolean': case 'null': case 'unknown':
        if (checks.length) fail(`${def.type} with checks`);
        d = { t: def.type };
        break;
      case 'literal': d = { t: 'literal', v: def.values as (string | number | boolean | null)[] }; break;
      case 'enum': d = { t: 'literal', v: Object.values(def.entries as Record<string, string | number>) }; break;
      case 'nullable': d = { t: 'nullable', of: walk(def.innerType as z.ZodType, where) }; break;
      case 'optional': d = { t: 'optional', of: walk(def.innerType as z.ZodType, where) }; break;
      case 'array': {
        const a: Desc & { t: 'array' } = { t: 'array', of: walk(def.element as z.ZodType, `${where}[]`) };
        for (const c of checks) {
          if (c.check === 'min_length') a.min = c.minimum as number;
          else if (c.check === 'max_length') a.max = c.maximum as number;
          else fail(`array check ${String(c.check)}`);
        }
        d = a;
        break;
      }
      case 'record': d = { t: 'record', k: walk(def.keyType as z.ZodType, `${where}{key}`), v: walk(def.valueType as z.ZodType, `${where}{}`) }; break;
      case 'object': {
        const catchall = def.catchall ? defOf(def.catchall).type : undefined;
        if (catchall !== undefined && catchall !== 'never') fail(`object with a catchall of ${catchall}`);
        const shape: Record<string, Ref> = {};
        for (const [k, v] of Object.entries(def.shape as Record<string, z.ZodType>)) shape[k] = walk(v, `${where}.${k}`);
        d = { t: 'object', shape, strict: catchall === 'never' };
        break;
      }
      case 'union': d = { t: 'union', of: (def.options as z.ZodType[]).map((o, i) => walk(o, `${where}|${i}`)) }; break;
      default: return fail(`a zod ${def.type}`);
    }
    const r = add(d);
    seen.set(schema, r);
    return r;
  };
  const results: Record<string, Ref> = {};
  for (const [m, spec] of Object.entries(METHODS)) results[m] = walk(spec.result as z.ZodType, m);
  const events: Record<string, Ref> = {};
  for (const [e, schema] of Object.entries(EVENTS)) events[e] = walk(schema as z.ZodType, `event ${e}`);
  return { table, results, events, envelope: walk(ServerMessageSchema as z.ZodType, 'message') };
}

/** The generated module's text (checks.generated.ts). */
export function generatedChecksSource(): string {
  const d = describeProtocol();
  return [
    '// Generated by `npm run build` from the zod schemas in core/protocol (scripts/gen-checks.mjs,',
    '// core/protocol/describe.ts): what the page checks, as data. Do not edit; a test fails when it',
    '// is out of date.',
    "import type { Described } from './describe';",
    '',
    `export const PROTOCOL: Described = ${JSON.stringify(d)};`,
    '',
  ].join('\n');
}
