// The page's checks (core/protocol/checks.ts over the described schemas) against zod itself, for
// every reply, every event and the envelope: on random valid messages and on the same messages
// broken at a random member (or given one more), both give the same verdict, and where they
// accept, the same result (unknown members dropped, as zod drops them).
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { z } from 'zod';
import { EVENTS, METHODS, ServerMessageSchema } from '../../../core/protocol/rpc';
import { describeProtocol, generatedChecksSource, type Desc, type Ref } from '../../../core/protocol/describe';
import { compileChecks } from '../../../core/protocol/checks';
import { PROTOCOL } from '../../../core/protocol/checks.generated';

const described = describeProtocol();
const checks = compileChecks(described);

/** Random valid values of a described schema. */
function arbitrary(ref: Ref): fc.Arbitrary<unknown> {
  const d: Desc = described.table[ref]!;
  switch (d.t) {
    case 'string': return fc.string({ minLength: d.min ?? 0, maxLength: Math.min(d.max ?? 10, (d.min ?? 0) + 10) }).filter((s) => !d.noNul || !s.includes('\0'));
    case 'number': {
      const lo = d.gte ?? (d.gt !== undefined ? d.gt + 1 : -1e9);
      const hi = d.lte ?? (d.lt !== undefined ? d.lt - 1 : 1e9);
      return d.int ? fc.integer({ min: lo, max: hi }) : fc.double({ min: lo, max: hi, noNaN: true, noDefaultInfinity: true });
    }
    case 'boolean': return fc.boolean();
    case 'null': return fc.constant(null);
    case 'unknown': return fc.jsonValue({ maxDepth: 2 });
    case 'literal': return fc.constantFrom(...d.v);
    case 'nullable': return fc.option(arbitrary(d.of), { nil: null });
    case 'optional': return fc.option(arbitrary(d.of), { nil: undefined });
    case 'array': return fc.array(arbitrary(d.of), { minLength: d.min ?? 0, maxLength: Math.min(d.max ?? 3, 3) });
    case 'record': return fc.dictionary(arbitrary(d.k) as fc.Arbitrary<string>, arbitrary(d.v), { maxKeys: 3 });
    case 'object': {
      const shape = Object.fromEntries(Object.entries(d.shape).map(([k, r]) => [k, arbitrary(r)]));
      const required = Object.entries(d.shape).filter(([, r]) => described.table[r]!.t !== 'optional').map(([k]) => k);
      return fc.record(shape, { requiredKeys: required });
    }
    case 'union': return fc.oneof(...d.of.map(arbitrary));
  }
}

/** Every place in a JSON value: [container, key] pairs. */
function places(v: unknown, out: [Record<string, unknown> | unknown[], string | number][] = []): typeof out {
  if (Array.isArray(v)) v.forEach((x, i) => { out.push([v, i]); places(x, out); });
  else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) { out.push([v as Record<string, unknown>, k]); places(x, out); }
  return out;
}

const BAD: unknown[] = [undefined, null, '', 'x', 'qcow2', 'raw', 'running', 'response', 'event', 0, -1, 1.5, 1e300, Infinity, NaN, true, false, [], {}, ['x'], { a: 1 }, 'a\0b'];

const roots: [string, z.ZodType, Ref][] = [
  ...Object.entries(METHODS).map(([m, s]) => [`reply to ${m}`, s.result as z.ZodType, described.results[m]!] as [string, z.ZodType, Ref]),
  ...Object.entries(EVENTS).map(([e, s]) => [`event ${e}`, s as z.ZodType, described.events[e]!] as [string, z.ZodType, Ref]),
  ['envelope', ServerMessageSchema as z.ZodType, described.envelope],
];

function verdicts(schema: z.ZodType, ref: Ref, v: unknown): { zod: unknown; ours: unknown } {
  const z = schema.safeParse(structuredClone(v));
  const mine = structuredClone(v);
  const f = checks.check(ref, mine);
  return { zod: z.success ? { ok: z.data } : 'refused', ours: f ? 'refused' : { ok: mine } };
}

describe('the page\'s checks', () => {
  it('are generated from the schemas as they stand (npm run build writes checks.generated.ts)', () => {
    expect(readFileSync(join(__dirname, '../../../core/protocol/checks.generated.ts'), 'utf8')).toBe(generatedChecksSource());
    expect(PROTOCOL).toEqual(described);
  });

  for (const [name, schema, ref] of roots) {
    it(`accept what zod accepts, with the same result: ${name}`, () => {
      fc.assert(fc.property(arbitrary(ref), (v) => {
        const { zod, ours } = verdicts(schema, ref, v);
        expect(zod).not.toBe('refused');
        expect(ours).toEqual(zod);
      }), { numRuns: 60 });
    });

    it(`give zod's verdict on a message broken anywhere, or given one more member: ${name}`, () => {
      fc.assert(fc.property(arbitrary(ref), fc.nat(), fc.constantFrom(...BAD.keys()), fc.boolean(), (v, at, bad, add) => {
        const all = places(v);
        if (!all.length) v = BAD[bad];
        else {
          const [where, key] = all[at % all.length]!;
          if (add && !Array.isArray(where)) (where as Record<string, unknown>)[`extra${at % 3}`] = BAD[bad];
          else if (BAD[bad] === undefined && !Array.isArray(where)) delete (where as Record<string, unknown>)[key as string];
          else (where as Record<string | number, unknown>)[key] = BAD[bad];
        }
        const { zod, ours } = verdicts(schema, ref, v);
        expect(ours).toEqual(zod);
      }), { numRuns: 150 });
    });
  }

  it('drop a record member named __proto__ as zod does (a JSON reply may carry one)', () => {
    const ref = described.results['image.details']!;
    const info = { 'virtual-size': 0, filename: '', format: 'qcow2', 'actual-size': 0, 'dirty-flag': false, 'format-specific': { type: 'qcow2', data: JSON.parse('{"__proto__": "", "compat": "1.1"}') } };
    const { zod, ours } = verdicts(METHODS['image.details'].result, ref, { info, chain: [], chainError: null });
    expect(ours).toEqual(zod);
    expect(Object.keys((ours as { ok: { info: typeof info } }).ok.info['format-specific'].data)).toEqual(['compat']);
  });

  it('name the member that is wrong', () => {
    const f = checks.check(described.results['settings.get']!, { theme: 'dark', concurrency: 'two', folders: [], onboarded: true });
    expect(f && `${f.path.join('.')}: ${f.what}`).toMatch(/^(concurrency: expected a number, got string|theme: .*)$/);
  });
});
