package org.mbquant.demo.core

/** One row of the result screen. */
class Prediction(val index: Int, val label: String, val probability: Double)

/** Softmax over the logits (in double, max-subtracted) and the k most probable classes; ties go to the lower
 *  index, as a stable descending sort does in mbquant's reference client. */
object TopK {
    fun softmax(logits: FloatArray): DoubleArray {
        var max = Double.NEGATIVE_INFINITY
        for (v in logits) if (v > max) max = v.toDouble()
        val e = DoubleArray(logits.size) { Math.exp(logits[it] - max) }
        val sum = e.sum()
        return DoubleArray(e.size) { e[it] / sum }
    }

    fun top(logits: FloatArray, labels: List<String>, k: Int): List<Prediction> {
        require(logits.size == labels.size) { "${logits.size} logits for ${labels.size} labels" }
        val p = softmax(logits)
        val order = (0 until logits.size).sortedWith(Comparator { a, b ->
            if (logits[a] != logits[b]) logits[b].compareTo(logits[a]) else a.compareTo(b)
        })
        return order.take(k).map { Prediction(it, labels[it], p[it]) }
    }
}
