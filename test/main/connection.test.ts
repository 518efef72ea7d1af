// One page's connection: a library event that arrives while the page waits for a library reply
// is not sent twice (the reply carries it); a newer one follows the reply; others pass at once.
import { describe, expect, it } from 'vitest';
import { Connection, type Dispatcher } from '../../main/services/rpc';

/** A dispatcher whose replies are released by hand: the library result is whatever `now` holds. */
function fake() {
  const waiting: (() => void)[] = [];
  let now: unknown = { v: 0 };
  const dispatch: Dispatcher = async (raw) => {
    const { id, method } = JSON.parse(raw as string) as { id: number; method: string };
    if (method !== 'library.get') return { type: 'response', id, ok: true, result: method };
    await new Promise<void>((r) => waiting.push(r));
    return { type: 'response', id, ok: true, result: now };
  };
  return { dispatch, release: () => waiting.shift()!(), set: (v: unknown) => { now = v; } };
}

const ask = (id: number, method: string) => JSON.stringify({ type: 'request', id, method, params: {} });
const tick = () => new Promise((r) => setImmediate(r));

describe('Connection', () => {
  it('holds a library event while a library reply is pending, and drops it when the reply carries it', async () => {
    const f = fake();
    const out: string[] = [];
    const c = new Connection(f.dispatch, (t) => out.push(`event ${t}`));
    const done = c.request(ask(1, 'library.get'), 10, (t) => out.push(`reply ${t}`));
    await tick();
    const snap = { v: 1 };
    f.set(snap);
    c.event('library', snap, () => 'library v1');
    c.event('job', {}, () => 'job');
    expect(out).toEqual(['event job']);
    f.release();
    await done;
    await tick();
    expect(out).toEqual(['event job', `reply ${JSON.stringify({ type: 'response', id: 1, ok: true, result: { v: 1 } })}`]);
  });

  it('sends a held event after the reply when the reply did not carry it', async () => {
    const f = fake();
    const out: string[] = [];
    const c = new Connection(f.dispatch, (t) => out.push(`event ${t}`));
    const done = c.request(ask(1, 'library.get'), 10, () => out.push('reply'));
    await tick();
    c.event('library', { v: 2 }, () => 'library v2');
    f.release();
    await done;
    expect(out).toEqual(['reply']);
    await tick();
    expect(out).toEqual(['reply', 'event library v2']);
  });

  it('sends library events at once when no library reply is pending', async () => {
    const f = fake();
    const out: string[] = [];
    const c = new Connection(f.dispatch, (t) => out.push(t));
    await c.request(ask(1, 'jobs.list'), 10, () => out.push('reply'));
    c.event('library', { v: 3 }, () => 'library v3');
    expect(out).toEqual(['reply', 'library v3']);
  });
});
