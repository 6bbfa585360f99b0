package org.mbquant.demo.core

/** A small JSON reader for the bundle's files (no Android or third-party imports): objects become Map<String, Any?>,
 *  arrays List<Any?>, numbers Double, plus String, Boolean and null. */
class JsonException(message: String) : Exception(message)

class Json private constructor(private val text: String) {
    private var pos = 0

    companion object {
        fun parse(text: String): Any? {
            val p = Json(text)
            val value = p.value()
            p.skipSpace()
            if (p.pos != text.length) throw JsonException("unexpected text at offset ${p.pos}")
            return value
        }
    }

    private fun skipSpace() {
        while (pos < text.length && text[pos].isWhitespace()) pos++
    }

    private fun value(): Any? {
        skipSpace()
        if (pos >= text.length) throw JsonException("unexpected end of JSON")
        return when (text[pos]) {
            '{' -> obj()
            '[' -> arr()
            '"' -> str()
            't' -> literal("true", true)
            'f' -> literal("false", false)
            'n' -> literal("null", null)
            else -> num()
        }
    }

    private fun literal(word: String, result: Any?): Any? {
        if (!text.startsWith(word, pos)) throw JsonException("bad literal at offset $pos")
        pos += word.length
        return result
    }

    private fun obj(): Map<String, Any?> {
        val out = LinkedHashMap<String, Any?>()
        pos++
        skipSpace()
        if (pos < text.length && text[pos] == '}') { pos++; return out }
        while (true) {
            skipSpace()
            if (pos >= text.length || text[pos] != '"') throw JsonException("expected a key at offset $pos")
            val key = str()
            skipSpace()
            if (pos >= text.length || text[pos] != ':') throw JsonException("expected ':' at offset $pos")
            pos++
            out[key] = value()
            skipSpace()
            if (pos < text.length && text[pos] == ',') { pos++; continue }
            if (pos < text.length && text[pos] == '}') { pos++; return out }
            throw JsonException("expected ',' or '}' at offset $pos")
        }
    }

    private fun arr(): List<Any?> {
        val out = ArrayList<Any?>()
        pos++
        skipSpace()
        if (pos < text.length && text[pos] == ']') { pos++; return out }
        while (true) {
            out.add(value())
            skipSpace()
            if (pos < text.length && text[pos] == ',') { pos++; continue }
            if (pos < text.length && text[pos] == ']') { pos++; return out }
            throw JsonException("expected ',' or ']' at offset $pos")
        }
    }

    private fun str(): String {
        val sb = StringBuilder()
        pos++
        while (pos < text.length) {
            val c = text[pos++]
            when (c) {
                '"' -> return sb.toString()
                '\\' -> {
                    if (pos >= text.length) throw JsonException("unterminated string")
                    val e = text[pos++]
                    when (e) {
                        'n' -> sb.append('\n'); 't' -> sb.append('\t'); 'r' -> sb.append('\r')
                        'b' -> sb.append('\b'); 'f' -> sb.append('\u000c')
                        'u' -> { sb.append(text.substring(pos, pos + 4).toInt(16).toChar()); pos += 4 }
                        else -> sb.append(e)
                    }
                }
                else -> sb.append(c)
            }
        }
        throw JsonException("unterminated string")
    }

    private fun num(): Double {
        val start = pos
        while (pos < text.length && (text[pos].isDigit() || text[pos] in "+-.eE")) pos++
        return text.substring(start, pos).toDoubleOrNull() ?: throw JsonException("bad number at offset $start")
    }
}
