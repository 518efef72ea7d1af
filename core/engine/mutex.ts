// Serialises metadata updates of one image; data I/O runs outside it.
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => { release = r; });
    await prev;
    try { return await fn(); } finally { release(); }
  }
}

/** Serialises operations on overlapping ranges (guest clusters), letting disjoint ones run together. */
export class RangeLock {
  private readonly held: { start: number; end: number; done: Promise<void> }[] = [];

  async lock(start: number, end: number): Promise<() => void> {
    for (;;) {
      const clash = this.held.find((h) => h.start < end && start < h.end);
      if (!clash) break;
      await clash.done;
    }
    let release!: () => void;
    const entry = { start, end, done: new Promise<void>((r) => { release = r; }) };
    this.held.push(entry);
    return () => {
      const i = this.held.indexOf(entry);
      if (i >= 0) this.held.splice(i, 1);
      release();
    };
  }
}
