// A bounded LRU of L2 tables keyed by host offset. Loads are de-duplicated so concurrent
// readers of the same table share one read; the bound is what lets a 1 TiB image map without
// holding every table.

export class TableCache {
  private readonly map = new Map<number, Promise<Buffer>>();

  constructor(private readonly capacity: number) {}

  get(offset: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.map.get(offset);
    if (hit) {
      this.map.delete(offset);
      this.map.set(offset, hit);
      return hit;
    }
    const p = load();
    this.map.set(offset, p);
    p.catch(() => { if (this.map.get(offset) === p) this.map.delete(offset); });
    while (this.map.size > this.capacity) {
      const oldest = this.map.keys().next().value as number;
      this.map.delete(oldest);
    }
    return p;
  }

  /** Replaces or inserts a table that the engine has just written. */
  set(offset: number, table: Buffer): void {
    this.map.delete(offset);
    this.map.set(offset, Promise.resolve(table));
  }

  delete(offset: number): void { this.map.delete(offset); }
  clear(): void { this.map.clear(); }
  get size(): number { return this.map.size; }
}
