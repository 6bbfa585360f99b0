// Runs the app's plain-Kotlin classes on the JVM (no Android): the host proof of the app's contract.
//
//   HostCheck tensors BUNDLE_DIR OUT.bin IMAGE...     preprocessed tensors, float32 little-endian, one per image
//   HostCheck topk BUNDLE_DIR LOGITS.bin K            LOGITS.bin: n k float32; prints "index prob" lines per row
import org.mbquant.demo.core.Bundle
import org.mbquant.demo.core.Preprocessor
import org.mbquant.demo.core.TopK
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import javax.imageio.ImageIO

fun argbOf(file: File): Triple<IntArray, Int, Int> {
    val img = ImageIO.read(file) ?: throw IllegalArgumentException("cannot decode $file")
    val r = img.raster
    val w = img.width
    val h = img.height
    val bands = r.numBands
    // raw samples, as Android decodes them (no colour-space conversion of grayscale images)
    val px = IntArray(w * h) { i ->
        val x = i % w
        val y = i / w
        if (bands < 3) {
            val v = r.getSample(x, y, 0)
            (0xff shl 24) or (v shl 16) or (v shl 8) or v
        } else {
            (0xff shl 24) or (r.getSample(x, y, 0) shl 16) or (r.getSample(x, y, 1) shl 8) or r.getSample(x, y, 2)
        }
    }
    return Triple(px, w, h)
}

fun main(args: Array<String>) {
    val bundle = Bundle.read(File(args[1]))
    if (args[0] == "tensors") {
        val pre = Preprocessor(bundle.spec)
        File(args[2]).outputStream().use { out ->
            for (path in args.drop(3)) {
                val (px, w, h) = argbOf(File(path))
                val t = pre.tensor(px, w, h)
                val buf = ByteBuffer.allocate(t.size * 4).order(ByteOrder.LITTLE_ENDIAN)
                for (v in t) buf.putFloat(v)
                out.write(buf.array())
            }
        }
    } else {
        val data = ByteBuffer.wrap(File(args[2]).readBytes()).order(ByteOrder.LITTLE_ENDIAN)
        val n = data.int
        val k = data.int
        val top = args[3].toInt()
        for (i in 0 until n) {
            val row = FloatArray(k) { data.float }
            println(TopK.top(row, bundle.labels, top).joinToString(" ") { "${it.index}:${"%.9f".format(it.probability)}" })
        }
    }
}
