// Runs tasks from an async source with a fixed number in flight: how jobs keep several
// reads and writes outstanding without unbounded memory.

export async function runPool<T>(source: AsyncIterable<T>, width: number, worker: (task: T, slot: number) => Promise<void>, signal?: AbortSignal): Promise<void> {
  const it = source[Symbol.asyncIterator]();
  let failed: unknown = null;
  const lane = async (slot: number) => {
    for (;;) {
      if (failed !== null) return;
      if (signal?.aborted) { failed ??= signal.reason; return; }
      let r: IteratorResult<T>;
      try { r = await it.next(); } catch (err) { failed ??= err; return; }
      if (r.done) return;
      try { await worker(r.value, slot); } catch (err) { failed ??= err; return; }
    }
  };
  await Promise.all(Array.from({ length: width }, (_, i) => lane(i)));
  if (failed !== null) throw failed;
}
