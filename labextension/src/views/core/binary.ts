/** Typed arrays over the binary buffers that arrive from the kernel (as `DataView`s). */

export type Numbers = Float32Array | Float64Array | Int32Array | Uint8Array | Uint32Array;

/** A typed array sharing the DataView's memory (copied only when it is not aligned). */
export function typed(view: DataView, dtype: string): Numbers {
  const ctor = {
    float32: Float32Array,
    float64: Float64Array,
    int32: Int32Array,
    uint8: Uint8Array,
    uint32: Uint32Array,
  }[dtype];
  if (!ctor) throw new Error(`unknown buffer dtype ${dtype}`);
  const size = ctor.BYTES_PER_ELEMENT;
  if (view.byteOffset % size === 0) {
    return new ctor(view.buffer, view.byteOffset, view.byteLength / size);
  }
  return new ctor(view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength));
}

/** A buffer that arrived as an ArrayBuffer, a typed array or a DataView, as a DataView. */
export function asDataView(buffer: unknown): DataView {
  if (buffer instanceof DataView) return buffer;
  if (buffer instanceof ArrayBuffer) return new DataView(buffer);
  if (ArrayBuffer.isView(buffer)) return new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  throw new Error("expected a binary buffer");
}
