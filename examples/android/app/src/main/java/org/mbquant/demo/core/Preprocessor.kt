package org.mbquant.demo.core

/**
 * An image (ARGB pixels, as android.graphics.Bitmap.getPixels gives them) -> the model's input tensor
 * (float32, NCHW, 1 x 3 x H x W), by the bundle's contract. It computes what mbquant's reference preprocessing
 * (Pillow + numpy) computes, to the bit: Pillow's luma for grayscale, Pillow's bilinear resampling (fixed-point,
 * 22 fraction bits, separable: horizontal pass, then vertical), torchvision's shorter-side resize and centre crop,
 * then (v * (1/255) - mean) / std in float32.
 */
class Preprocessor(private val spec: PreprocessSpec) {

    fun tensor(argb: IntArray, width: Int, height: Int): FloatArray {
        require(argb.size == width * height) { "pixels ${argb.size} != $width x $height" }
        val channels = if (spec.grayscale) 1 else 3
        var planes = Array(channels) { c -> IntArray(width * height) { i -> channel(argb[i], c) } }
        var w = width
        var h = height
        if (spec.stretch) {
            planes = Array(channels) { PilResize.bilinear(planes[it], w, h, spec.width, spec.height) }
            w = spec.width
            h = spec.height
        } else {
            val nw: Int
            val nh: Int
            if (w <= h) { nw = spec.shorterSide; nh = (spec.shorterSide.toDouble() * h / w).toInt() }
            else { nh = spec.shorterSide; nw = (spec.shorterSide.toDouble() * w / h).toInt() }
            planes = Array(channels) { PilResize.bilinear(planes[it], w, h, nw, nh) }
            val top = Math.rint((nh - spec.height) / 2.0).toInt()
            val left = Math.rint((nw - spec.width) / 2.0).toInt()
            planes = Array(channels) { c -> crop(planes[c], nw, left, top, spec.width, spec.height) }
            w = spec.width
            h = spec.height
        }
        val out = FloatArray(3 * w * h)
        for (c in 0 until 3) {
            val plane = planes[if (channels == 1) 0 else c]
            for (i in 0 until w * h) {
                out[c * w * h + i] = (plane[i].toFloat() * SCALE - spec.mean[c]) / spec.std[c]
            }
        }
        return out
    }

    companion object {
        /** 1/255 in float32, multiplied as mbquant (and torchvision) do: the same bits as the Python path. */
        const val SCALE = 1f / 255f
    }

    private fun channel(p: Int, c: Int): Int {
        val r = (p shr 16) and 0xff
        val g = (p shr 8) and 0xff
        val b = p and 0xff
        if (spec.grayscale) return (r * 19595 + g * 38470 + b * 7471 + 0x8000) shr 16   // Pillow's "L"
        return when (c) { 0 -> r; 1 -> g; else -> b }
    }

    private fun crop(plane: IntArray, stride: Int, left: Int, top: Int, w: Int, h: Int): IntArray =
        IntArray(w * h) { i -> plane[(top + i / w) * stride + left + i % w] }
}

/** Pillow's bilinear resampling of one 8-bit plane (libImaging/Resample.c: precompute_coeffs,
 *  normalize_coeffs_8bpc, ImagingResampleHorizontal_8bpc / Vertical_8bpc). */
object PilResize {
    private const val PRECISION_BITS = 32 - 8 - 2

    private class Coeffs(val bounds: IntArray, val k: IntArray, val ksize: Int)

    private fun filter(x: Double): Double {
        val a = Math.abs(x)
        return if (a < 1.0) 1.0 - a else 0.0
    }

    private fun coeffs(inSize: Int, outSize: Int): Coeffs {
        val scale = inSize.toDouble() / outSize
        val filterscale = if (scale < 1.0) 1.0 else scale
        val support = 1.0 * filterscale
        val ksize = Math.ceil(support).toInt() * 2 + 1
        val pre = DoubleArray(outSize * ksize)
        val bounds = IntArray(outSize * 2)
        val ss = 1.0 / filterscale
        for (xx in 0 until outSize) {
            val center = (xx + 0.5) * scale
            var xmin = (center - support + 0.5).toInt()
            if (xmin < 0) xmin = 0
            var xmax = (center + support + 0.5).toInt()
            if (xmax > inSize) xmax = inSize
            xmax -= xmin
            var ww = 0.0
            for (x in 0 until xmax) {
                val w = filter((x + xmin - center + 0.5) * ss)
                pre[xx * ksize + x] = w
                ww += w
            }
            for (x in 0 until xmax) if (ww != 0.0) pre[xx * ksize + x] /= ww
            bounds[xx * 2] = xmin
            bounds[xx * 2 + 1] = xmax
        }
        val one = (1 shl PRECISION_BITS).toDouble()
        val k = IntArray(pre.size) { i -> if (pre[i] < 0) (-0.5 + pre[i] * one).toInt() else (0.5 + pre[i] * one).toInt() }
        return Coeffs(bounds, k, ksize)
    }

    private fun clip8(v: Int): Int = when {
        v >= (1 shl PRECISION_BITS shl 8) -> 255
        v <= 0 -> 0
        else -> v shr PRECISION_BITS
    }

    fun bilinear(src: IntArray, w: Int, h: Int, ow: Int, oh: Int): IntArray {
        if (ow == w && oh == h) return src.copyOf()
        val vert = coeffs(h, oh)
        val first = vert.bounds[0]
        val last = vert.bounds[oh * 2 - 2] + vert.bounds[oh * 2 - 1]
        var plane = src
        var pw = w
        var rowOffset = 0
        if (ow != w) {   // horizontal pass over the rows the vertical pass reads
            val hor = coeffs(w, ow)
            val rows = last - first
            val tmp = IntArray(ow * rows)
            for (yy in 0 until rows) {
                for (xx in 0 until ow) {
                    val xmin = hor.bounds[xx * 2]
                    val xmax = hor.bounds[xx * 2 + 1]
                    var ss = 1 shl (PRECISION_BITS - 1)
                    for (x in 0 until xmax) ss += src[(yy + first) * w + x + xmin] * hor.k[xx * hor.ksize + x]
                    tmp[yy * ow + xx] = clip8(ss)
                }
            }
            plane = tmp
            pw = ow
            rowOffset = first
        }
        if (oh == h) return plane
        val out = IntArray(pw * oh)
        for (yy in 0 until oh) {
            val ymin = vert.bounds[yy * 2] - rowOffset
            val ymax = vert.bounds[yy * 2 + 1]
            for (xx in 0 until pw) {
                var ss = 1 shl (PRECISION_BITS - 1)
                for (y in 0 until ymax) ss += plane[(y + ymin) * pw + xx] * vert.k[yy * vert.ksize + y]
                out[yy * pw + xx] = clip8(ss)
            }
        }
        return out
    }
}
