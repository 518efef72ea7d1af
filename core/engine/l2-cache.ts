// A bounded LRU of L2 tables keyed by host offset. Loads are de-duplicated so concurrent
// readers of the same table share one read; the bound is what lets a 1 TiB image map without
// holding every table.

export class TableCache {
  private readonly map = new Map<number, Promise<Buffer>>();
  /** Tables changed in memory and not yet written: never evicted until written back. */
  readonly dirty = new Map<number, Buffer>();

  /** The most recently used key: already last in the LRU order, so a hit on it moves nothing. */
  private newest = -1;

  constructor(private readonly capacity: number) {}

  get(offset: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.map.get(offset);
    if (hit) {
      // Runs of clusters use one table after another: most lookups are for the newest.
      if (offset !== this.newest) {
        this.map.delete(offset);
        this.map.set(offset, hit);
        this.newest = offset;
      }
      return hit;
    }
    const p = load();
    this.map.set(offset, p);
    this.newest = offset;
    p.catch(() => { if (this.map.get(offset) === p) this.map.delete(offset); });
    this.evict();
    return p;
  }

  private evict(): void {
    if (this.map.size <= this.capacity) return;
    for (const k of this.map.keys()) {
      if (this.map.size <= this.capacity) break;
      if (!this.dirty.has(k)) this.map.delete(k);
    }
  }

  has(offset: number): boolean { return this.map.has(offset); }

  markDirty(offset: number, table: Buffer): void {
    this.dirty.set(offset, table);
  }

  /** Replaces or inserts a table that the engine has just written. */
  set(offset: number, table: Buffer): void {
    this.map.delete(offset);
    this.map.set(offset, Promise.resolve(table));
    this.newest = offset;
    this.evict();
  }

  delete(offset: number): void { this.map.delete(offset); this.dirty.delete(offset); }
  clear(): void { this.map.clear(); }
  get size(): number { return this.map.size; }
}
